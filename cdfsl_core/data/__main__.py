"""``python -m cdfsl_core.data list|check``: what is registered, and whether a dataset reads cleanly."""

from __future__ import annotations

from tqdm import tqdm

from cdfsl_core.cli import command, parser
from cdfsl_core.data import dataset_spec, list_datasets, load_dataset
from cdfsl_core.errors import DatasetError


def build_parser():
    parser_ = parser("python -m cdfsl_core.data", __doc__)
    sub = parser_.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered datasets with their layout and download source")
    check = sub.add_parser("check", help="open every image of a dataset and report unreadable ones")
    check.add_argument("name")
    check.add_argument("--root", default=None, help="data root (default: $CDFSL_DATA_ROOT)")
    return parser_


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for name in list_datasets():
            spec = dataset_spec(name)
            print(f"{name}: {spec.description}")
            if spec.layout:
                print(f"    layout:   {spec.layout}\n    download: {spec.download}")
        return 0
    dataset = load_dataset(args.name, args.root)
    bad = []
    for i in tqdm(range(len(dataset)), desc=f"checking {args.name}"):
        try:
            dataset.load_image(i)
        except DatasetError as err:
            bad.append(str(err))
    counts = {c: 0 for c in dataset.classes}
    for t in dataset.targets:
        counts[dataset.classes[t]] += 1
    for name, count in counts.items():
        print(f"{count:8d}  {name}")
    print(f"{len(dataset)} images, {len(dataset.classes)} classes, {len(bad)} unreadable")
    for message in bad[:20]:
        print("  " + message)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
