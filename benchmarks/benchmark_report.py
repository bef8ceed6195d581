"""How every benchmark ends: the machine and the command added to its result, the result printed,
and written atomically as JSON when a path is given."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from cdfsl_core.atomic import write_json


def finish(result: dict[str, Any], script: str, argv: list[str] | None, path: Path | None) -> int:
    """Add ``machine`` and ``command`` (``script`` with its arguments) to ``result``, print it and
    write it to ``path`` (folders created) when given; returns 0, the script's exit status."""
    result["machine"] = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    result["command"] = f"benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(result, indent=2))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    return 0
