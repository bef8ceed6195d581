"""Weights files and architectures, checked without building a model.

What every loader and command asks before it loads anything: is this architecture known
(:func:`check_architecture`, the package's JSON configs registered with open_clip as open_clip
registers its own: :func:`open_clip_registered`), is this file a readable checkpoint of its kind
(:func:`check_checkpoint`) and of this architecture (:func:`check_checkpoint_fits`, on PyTorch's
meta device), and what is its content hash (:func:`file_sha256`). :mod:`cdfsl_core.models` loads
(and saves) models on top of it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from cdfsl_core.errors import CheckpointError

# open_clip and torch are imported where they are used: the commands' --help answer without them.

__all__ = ["PACKAGE_ARCHITECTURES", "architecture_widths", "check_architecture", "check_checkpoint",
           "check_checkpoint_fits", "file_sha256", "open_clip_registered"]

_CONFIG_DIR = resources.files("cdfsl_core") / "model_configs"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


PACKAGE_ARCHITECTURES: list[str] = sorted(p.stem for p in Path(str(_CONFIG_DIR)).glob("*.json"))
_REGISTERED = False


def open_clip_registered():
    """open_clip, with the package's JSON architectures registered (once), as open_clip registers its own."""
    global _REGISTERED
    import open_clip

    if not _REGISTERED:
        open_clip.add_model_config(Path(str(_CONFIG_DIR)))
        _REGISTERED = True
    return open_clip


def architecture_widths(name: str) -> dict[str, int]:
    """The residual widths of an architecture's towers (``{"vision": 768, "text": 512}``), from its
    config, without building it; empty when the config does not say (timm towers)."""
    cfg = open_clip_registered().get_model_config(name) or {}
    widths = {}
    for tower, key in (("vision", "vision_cfg"), ("text", "text_cfg")):
        width = (cfg.get(key) or {}).get("width")
        if isinstance(width, int):
            widths[tower] = width
    return widths


def check_architecture(name: str) -> None:
    """A :class:`CheckpointError` naming the known architectures when ``name`` is not one."""
    if name not in open_clip_registered().list_models():
        raise CheckpointError(
            f"Unknown architecture {name!r}. Expected an open_clip model name "
            f"(e.g. ViT-B-16, ViT-B-32, ViT-L-14, *-quickgelu) or one of this package's: "
            f"{', '.join(PACKAGE_ARCHITECTURES)}. `python -m cdfsl_core.models list` lists them."
        )


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, read without loading its values where possible."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")} \
        if isinstance(state, dict) else {}


_FITS: set[tuple[str, str, int, int]] = set()  # (architecture, file, size, mtime) found to fit, per process


def check_checkpoint_fits(name: str, path: str | os.PathLike[str]) -> None:
    """A :class:`CheckpointError` when the checkpoint at ``path`` cannot be architecture ``name``'s
    (its tensors' names and shapes against the model built on the meta device: no memory, no
    values). Positional embeddings may differ in length (open_clip resizes them on load)."""
    import logging

    import torch

    path = Path(path).resolve()
    stat = path.stat()
    key = (name, str(path), stat.st_size, stat.st_mtime_ns)
    if key in _FITS:
        return
    found = {key.removeprefix("module."): shape for key, shape in _checkpoint_shapes(path).items()}
    if not found:
        return  # not a plain state dict (open_clip's own loader decides)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that a model built without weights is random: it is meant to be
    try:
        with torch.device("meta"):
            expected = {key: tuple(value.shape) for key, value in
                        open_clip_registered().create_model(name, pretrained=None, device="meta").state_dict().items()}
    finally:
        root.setLevel(level)
    wrong = [f"{key} {found[key]} (the architecture has {shape})" for key, shape in expected.items()
             if key in found and found[key] != shape and not key.endswith("positional_embedding")]
    missing = [key for key in expected if key not in found and key not in ("logit_bias", "attn_mask")]
    if wrong or len(missing) > len(expected) // 2:
        detail = "; ".join(wrong[:3]) if wrong else f"{len(missing)} of its {len(expected)} tensors are missing " \
            f"(e.g. {', '.join(missing[:3])})"
        raise CheckpointError(
            f"Weights in {path} do not fit architecture {name!r}: {detail}. Pass the architecture the checkpoint was "
            "trained with (--model; its model card or config says which)."
        )
    _FITS.add(key)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (cached per process by path, size and modification time: hashing
    ViT-B/16's 600 MB takes about 1.5 s)."""
    import hashlib

    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def check_checkpoint(path: str | os.PathLike[str]) -> None:
    """Fail with a :class:`CheckpointError` naming ``path`` when it is not a readable checkpoint of
    its kind: the safetensors header (cheap, nothing is loaded), or a torch file read with
    ``weights_only=True`` and memory-mapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(
                f"{path} is not a valid safetensors file ({err}). It may be truncated or another format; "
                "download or save it again (save_checkpoint writes valid files)."
            ) from None
        return
    import torch

    try:
        try:
            torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(str(path), map_location="cpu", weights_only=True)  # a legacy (non-zip) torch file
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in reason or "Weights only load failed" in str(err):
            reason = "it holds objects other than tensors and plain containers"
        raise CheckpointError(
            f"{path} is not a valid torch checkpoint of an open_clip state dict ({reason}). It may be "
            "truncated, damaged, or a pickled training object; download it again, or load it where it was "
            "made and save its state dict with save_checkpoint."
        ) from None
