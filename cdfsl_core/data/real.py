"""The real CDFSL datasets in their on-disk layouts (BSCD-FSL and the ATHA/TIR authors' code).

Each loader accepts either the data root that holds the dataset's folder or that folder itself,
lists images in a fixed order (sorted class folders, then sorted file names; CSV row order for
CSV datasets) and gives readable class names, as prompts use them.
"""

from __future__ import annotations

import csv
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from cdfsl_core.data.base import ImageListDataset, Transform, check_files_exist, image_files
from cdfsl_core.data.registry import register_dataset
from cdfsl_core.errors import DatasetError

EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_NAMES = (
    "Melanoma",
    "Melanocytic Nevus",
    "Basal Cell Carcinoma",
    "Actinic Keratosis",
    "Benign Keratosis",
    "Dermatofibroma",
    "Vascular Lesion",
)

CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")

# PlantVillage plant names that read badly when only underscores are replaced.
_PLANT_NAMES = {
    "Corn_(maize)": "corn",
    "Cherry_(including_sour)": "cherry",
    "Pepper,_bell": "bell pepper",
}


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip().lower()


def plantvillage_name(folder: str) -> str:
    """``Apple___Apple_scab`` -> ``apple with apple scab``; ``Tomato___healthy`` -> ``healthy tomato``."""
    if "___" not in folder:
        return _words(folder)
    plant_raw, disease_raw = folder.split("___", 1)
    plant = _PLANT_NAMES.get(plant_raw, _words(plant_raw))
    disease = _words(disease_raw)
    return f"healthy {plant}" if disease == "healthy" else f"{plant} with {disease}"


def _locate(root: Path, candidates: Iterable[Path], ok, name: str, layout: str, download: str) -> Path:
    """The first candidate folder that passes ``ok``; a clear error listing them otherwise."""
    tried = []
    for candidate in candidates:
        tried.append(str(candidate))
        if candidate.is_dir() and ok(candidate):
            return candidate
    raise DatasetError(
        f"{name}: the expected layout was not found under data root {root}. Looked for: "
        f"{'; '.join(tried)}. Expected: {layout}. Fix the data root, or download from {download}."
    )


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_dataset(
    name: str, root: Path, folder: Path, readable, transform: Transform | None
) -> ImageListDataset:
    paths: list[Path] = []
    targets: list[int] = []
    classes: list[str] = []
    seen: dict[str, Path] = {}
    for class_dir in _class_folders(folder):
        key = " ".join(readable(class_dir.name).casefold().split())
        if key in seen:
            raise DatasetError(
                f"{name}: class folders {seen[key]} and {class_dir} both read as the class name "
                f"{readable(class_dir.name)!r} (names are compared ignoring case and spacing), so prompts could not tell "
                "them apart. Merge the two folders into one, or rename one of them."
            )
        seen[key] = class_dir
    for label, class_dir in enumerate(_class_folders(folder)):
        files = image_files(class_dir)
        if not files:
            raise DatasetError(
                f"{name}: class folder {class_dir} holds no images ({', '.join(s for s in ('.jpg', '.png'))}, ...). "
                "Remove the empty folder or restore its images."
            )
        classes.append(readable(class_dir.name))
        paths.extend(files)
        targets.extend([label] * len(files))
    return ImageListDataset(name, folder, paths, targets, classes, transform, source=str(folder))


def _read_csv(path: Path, required: Sequence[str], name: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{name}: CSV {path} does not exist. Expected it in the dataset's layout; re-extract the archive.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(
                f"{name}: CSV {path} lacks column(s) {missing}; found {header}. Expected columns "
                f"{list(required)} (the dataset's original header); use the original file."
            )
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


# ---------------------------------------------------------------- CropDiseases
CROP_LAYOUT = "<root>/CropDiseases/dataset/train/<PlantVillage class>/*.jpg"
CROP_DOWNLOAD = "https://www.kaggle.com/saroz014/plant-disease (BSCD-FSL's CropDiseases)"


@register_dataset(
    "cropdiseases",
    description="CropDiseases (PlantVillage), 38 plant/disease classes",
    layout=CROP_LAYOUT,
    download=CROP_DOWNLOAD,
)
def load_cropdiseases(root: Path, transform: Transform | None = None) -> ImageListDataset:
    def ok(folder: Path) -> bool:
        return any("___" in p.name for p in _class_folders(folder))

    folder = _locate(
        root,
        [root / "CropDiseases" / "dataset" / "train", root / "dataset" / "train", root / "train", root],
        ok,
        "cropdiseases",
        CROP_LAYOUT,
        CROP_DOWNLOAD,
    )
    return _folder_dataset("cropdiseases", root, folder, plantvillage_name, transform)


# ---------------------------------------------------------------- EuroSAT
EUROSAT_LAYOUT = "<root>/EuroSAT/2750/<AnnualCrop|Forest|...>/*.jpg"
EUROSAT_DOWNLOAD = "https://madm.dfki.de/files/sentinel/EuroSAT.zip (RGB version)"


@register_dataset(
    "eurosat",
    description="EuroSAT RGB satellite tiles, 10 land-use classes",
    layout=EUROSAT_LAYOUT,
    download=EUROSAT_DOWNLOAD,
)
def load_eurosat(root: Path, transform: Transform | None = None) -> ImageListDataset:
    def ok(folder: Path) -> bool:
        return any(p.name in EUROSAT_NAMES for p in _class_folders(folder))

    folder = _locate(
        root, [root / "EuroSAT" / "2750", root / "2750", root], ok, "eurosat", EUROSAT_LAYOUT, EUROSAT_DOWNLOAD
    )
    unknown = [p.name for p in _class_folders(folder) if p.name not in EUROSAT_NAMES]
    if unknown:
        raise DatasetError(
            f"eurosat: unexpected class folders {unknown} in {folder}. Expected only "
            f"{sorted(EUROSAT_NAMES)}; move the others out."
        )
    return _folder_dataset("eurosat", root, folder, EUROSAT_NAMES.__getitem__, transform)


# ---------------------------------------------------------------- ISIC 2018
ISIC_CSV = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_IMAGES = "ISIC2018_Task3_Training_Input"
ISIC_LAYOUT = f"<root>/ISIC/{ISIC_CSV} (columns image,{','.join(ISIC_COLUMNS)}) and <root>/ISIC/{ISIC_IMAGES}/<image>.jpg"
ISIC_DOWNLOAD = "https://challenge.isic-archive.com/data/#2018 (Task 3 training input and ground truth)"


@register_dataset(
    "isic",
    description="ISIC 2018 Task 3 skin lesions, 7 classes",
    layout=ISIC_LAYOUT,
    download=ISIC_DOWNLOAD,
)
def load_isic(root: Path, transform: Transform | None = None) -> ImageListDataset:
    folder = _locate(
        root, [root / "ISIC", root], lambda f: (f / ISIC_CSV).exists() or (f / ISIC_IMAGES).is_dir(),
        "isic", ISIC_LAYOUT, ISIC_DOWNLOAD,
    )
    csv_path = folder / ISIC_CSV
    rows = _read_csv(csv_path, ("image", *ISIC_COLUMNS), "isic")
    paths, targets = [], []
    for line, row in enumerate(rows, start=2):
        try:
            scores = [float(row[c]) for c in ISIC_COLUMNS]
        except ValueError as err:
            raise DatasetError(
                f"isic: row {line} of {csv_path} has a non-numeric label ({err}); expected one-hot "
                "0/1 values in the class columns."
            ) from None
        ones = [i for i, s in enumerate(scores) if s == 1.0]
        if len(ones) != 1 or any(s not in (0.0, 1.0) for s in scores):
            shown = ", ".join(f"{c}={row[c]!r}" for c in ISIC_COLUMNS)
            raise DatasetError(
                f"isic: row {line} of {csv_path} ({row.get('image', '?')}) is not one-hot ({shown}); expected exactly "
                "one 1 and 0 elsewhere in the class columns, as in the original ground-truth file. Fix or remove "
                "the row (it would otherwise be read as some class)."
            )
        targets.append(ones[0])
        paths.append(folder / ISIC_IMAGES / f"{row['image']}.jpg")
    check_files_exist("isic", paths, csv_path)
    return ImageListDataset("isic", folder, paths, targets, ISIC_NAMES, transform, source=str(csv_path))


# ---------------------------------------------------------------- ChestX-ray14
CHESTX_LAYOUT = "<root>/chestX/Data_Entry_2017.csv (columns 'Image Index', 'Finding Labels') and <root>/chestX/images/*.png"
CHESTX_DOWNLOAD = "https://www.kaggle.com/nih-chest-xrays/data (NIH ChestX-ray14)"


@register_dataset(
    "chestx",
    description="NIH ChestX-ray14, 7 single-label classes",
    layout=CHESTX_LAYOUT,
    download=CHESTX_DOWNLOAD,
)
def load_chestx(root: Path, transform: Transform | None = None) -> ImageListDataset:
    folder = _locate(
        root, [root / "chestX", root / "ChestX", root], lambda f: (f / "Data_Entry_2017.csv").exists(),
        "chestx", CHESTX_LAYOUT, CHESTX_DOWNLOAD,
    )
    csv_path = folder / "Data_Entry_2017.csv"
    rows = _read_csv(csv_path, ("Image Index", "Finding Labels"), "chestx")
    index = {name: i for i, name in enumerate(CHESTX_CLASSES)}
    paths, targets = [], []
    for row in rows:
        # Single-label rows of the 7 classes only: "a|b" rows, "No Finding", "Pneumonia" and the
        # other findings are dropped, as in BSCD-FSL.
        label = row["Finding Labels"]
        if label in index:
            paths.append(folder / "images" / row["Image Index"])
            targets.append(index[label])
    check_files_exist("chestx", paths, csv_path)
    return ImageListDataset("chestx", folder, paths, targets, CHESTX_CLASSES, transform, source=str(csv_path))


# ---------------------------------------------------------------- miniImageNet
MINI_LAYOUT = (
    "<root>/miniImageNet/<split>/<wnid>/*.jpg (an ImageFolder), or <root>/miniImageNet/<split>.csv "
    "(columns filename,label) with <root>/miniImageNet/images/"
)
MINI_DOWNLOAD = "the Ravi & Larochelle split (train.csv/val.csv/test.csv) over ImageNet images"
_WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_readable_names() -> dict[str, str]:
    """wnid -> CLIP's readable ImageNet class name (the names CLIP's own prompts use)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo("imagenet-1k").label_names()  # sorted wnids = the class-index order
    return dict(zip(wnids, IMAGENET_CLASSNAMES, strict=True))


def _mini_name(label: str) -> str:
    return imagenet_readable_names().get(label, label.replace("_", " "))


@register_dataset(
    "miniimagenet",
    description="miniImageNet (source domain), 64/16/20 classes in train/val/test",
    layout=MINI_LAYOUT,
    download=MINI_DOWNLOAD,
)
def load_miniimagenet(root: Path, transform: Transform | None = None, split: str = "train") -> ImageListDataset:
    if split not in ("train", "val", "test"):
        raise DatasetError(f"miniimagenet: split={split!r}; expected 'train', 'val' or 'test'.")

    def ok(folder: Path) -> bool:
        return (folder / f"{split}.csv").is_file() or (folder / split).is_dir() or any(
            _WNID.match(p.name) for p in _class_folders(folder)
        )

    folder = _locate(
        root,
        [root / "miniImageNet", root / "mini-imagenet", root / "miniimagenet", root],
        ok,
        "miniimagenet",
        MINI_LAYOUT,
        MINI_DOWNLOAD,
    )
    csv_path = folder / f"{split}.csv"
    if csv_path.is_file():
        rows = _read_csv(csv_path, ("filename", "label"), "miniimagenet")
        wnids = sorted({row["label"] for row in rows})
        index = {w: i for i, w in enumerate(wnids)}
        paths = [folder / "images" / row["filename"] for row in rows]
        targets = [index[row["label"]] for row in rows]
        check_files_exist("miniimagenet", paths, csv_path)
        classes = [_mini_name(w) for w in wnids]
        return ImageListDataset("miniimagenet", folder, paths, targets, classes, transform, source=str(csv_path))
    image_root = folder / split if (folder / split).is_dir() else folder
    return _folder_dataset("miniimagenet", root, image_root, _mini_name, transform)


# ---------------------------------------------------------------- the authors' novel.json
JSON_LAYOUT = '<root> = a JSON file {"image_names": [...], "image_labels": [...], optional "label_names": [...]}'


@register_dataset(
    "novel-json",
    description="any image list in the ATHA/TIR authors' novel.json format",
    layout=JSON_LAYOUT,
    download="written by the authors' data scripts, or by hand",
)
def load_novel_json(
    root: Path,
    transform: Transform | None = None,
    class_names: Sequence[str] | None = None,
    image_root: str | Path | None = None,
    name: str = "novel-json",
) -> ImageListDataset:
    """Load a ``novel.json``; relative image paths are taken from ``image_root`` or the JSON's folder.

    Absolute paths from another machine are re-rooted under ``image_root`` by the longest tail
    that exists there (found on the first image, applied to all).
    """
    json_path = root
    if json_path.is_dir():
        json_path = json_path / "novel.json"
    if not json_path.is_file():
        raise DatasetError(f"{name}: {json_path} does not exist. Expected {JSON_LAYOUT}.")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{name}: {json_path} is not valid JSON ({err}). Expected {JSON_LAYOUT}.") from None
    missing = [k for k in ("image_names", "image_labels") if k not in meta]
    if missing:
        raise DatasetError(f"{name}: {json_path} lacks key(s) {missing}. Expected {JSON_LAYOUT}.")
    names = [str(n) for n in meta["image_names"]]
    labels = [int(x) for x in meta["image_labels"]]
    base = Path(image_root) if image_root is not None else json_path.parent
    paths = [Path(n) if Path(n).is_absolute() else base / n for n in names]
    if paths and not paths[0].is_file() and Path(names[0]).is_absolute():
        parts = Path(names[0]).parts[1:]
        strip = next((i for i in range(len(parts)) if (base / Path(*parts[i:])).is_file()), None)
        if strip is not None:
            paths = [base / Path(*Path(n).parts[1 + strip :]) for n in names]
    check_files_exist(name, paths, json_path)
    n_classes = max(labels) + 1 if labels else 0
    classes = list(class_names or meta.get("label_names") or [f"class {i}" for i in range(n_classes)])
    return ImageListDataset(name, base, paths, labels, classes, transform, source=str(json_path))
