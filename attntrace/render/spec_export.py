"""A spec written back as YAML, its arrays in a sidecar .safetensors: `attntrace import-model`.

The YAML holds what a person edits (heads, layout, masks, norms, activation,
scale, tokens) and names every array by key in the sidecar, which it sits next
to (``{safetensors: model.safetensors, key: blocks.0.attention.W_q}``); the
sidecar is read lazily, so a 90 MB model spec loads in milliseconds.  Both
files are written atomically and never over an input of the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import yaml

from attntrace.inputs.files import refuse_inputs, write_all
from attntrace.inputs.safetensors_io import safetensors_bytes


class _Sidecar:
    """Arrays collected while the YAML is built; each becomes one tensor of the sidecar."""

    def __init__(self, name: str):
        self.name = name
        self.tensors: Dict[str, np.ndarray] = {}

    def ref(self, key: str, array) -> Optional[Dict[str, str]]:
        if array is None:
            return None
        self.tensors[key] = np.asarray(array.data if hasattr(array, "data") else array)
        return {"safetensors": self.name, "key": key}


def spec_document(spec, sidecar: _Sidecar) -> Dict[str, Any]:
    """The YAML mapping of a (resolved) spec: a spec of blocks or one attention layer."""
    doc: Dict[str, Any] = {"version": 1, "name": spec.name}
    if spec.description:
        doc["description"] = spec.description
    doc["tokens"] = list(spec.tokens)
    doc["embeddings"] = sidecar.ref("embeddings", spec.source.embeddings)
    positional = _positional(spec.positional, sidecar)
    if positional is not None:
        doc["positional"] = positional
    if spec.embed_norm is not None:
        doc["embed_norm"] = _norm(spec.embed_norm, "embed_norm", sidecar, with_kind=True)
    if spec.is_model:
        doc["blocks"] = [_block(block, f"blocks.{i}", sidecar) for i, block in enumerate(spec.blocks)]
    else:
        doc["attention"] = _attention(spec.attention, "attention", sidecar)
    if spec.final_norm is not None:
        doc["ln_final"] = _norm(spec.final_norm, "ln_final", sidecar, with_kind=True)
    return doc


def _positional(pos, sidecar: _Sidecar) -> Optional[Dict[str, Any]]:
    if pos.kind == "none":
        return None
    out: Dict[str, Any] = {"kind": pos.kind}
    if pos.kind == "learned":
        out["table"] = sidecar.ref("positional.table", pos.table)
    if pos.kind in ("rope", "sinusoidal"):
        out["base"] = float(pos.base)
    if pos.kind == "rope":
        out["pairing"] = pos.pairing
    if pos.type_table is not None:
        out["token_types"] = {"table": sidecar.ref("positional.token_types.table", pos.type_table),
                              "ids": sidecar.ref("positional.token_types.ids", pos.type_ids)}
    return out


def _attention(att, where: str, sidecar: _Sidecar) -> Dict[str, Any]:
    out: Dict[str, Any] = {"heads": att.heads}
    if att.kv_heads:
        out["kv_heads"] = att.kv_heads
    if att.d_head:
        out["d_head"] = att.d_head
    out["layout"] = att.layout
    if att.scale != "auto":
        out["scale"] = att.scale
    for name in ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o"):
        value = sidecar.ref(f"{where}.{name}", getattr(att, name))
        if value is not None:
            out[name] = value
    mask = _mask(att.mask, where, sidecar)
    if mask is not None:
        out["mask"] = mask
    return out


def _mask(mask, where: str, sidecar: _Sidecar) -> Any:
    if mask.is_empty:
        return None
    out: Dict[str, Any] = {}
    if mask.causal:
        out["causal"] = True
    for key in ("window", "prefix"):
        if getattr(mask, key):
            out[key] = int(getattr(mask, key))
    for key in ("padding", "matrix"):
        if getattr(mask, key) is not None:
            out[key] = sidecar.ref(f"{where}.mask.{key}", getattr(mask, key))
            out["convention"] = mask.convention
    return out


def _norm(norm, where: str, sidecar: _Sidecar, with_kind: bool = False) -> Dict[str, Any]:
    out: Dict[str, Any] = {"kind": norm.kind, "eps": float(norm.eps)} if with_kind else {}
    for part in ("weight", "bias"):
        value = sidecar.ref(f"{where}.{part}", getattr(norm, part))
        if value is not None:
            out[part] = value
    return out


def _block(block, where: str, sidecar: _Sidecar) -> Dict[str, Any]:
    out: Dict[str, Any] = {"attention": _attention(block.attention, f"{where}.attention", sidecar)}
    norm = block.ln1 or block.ln2
    if norm is not None:
        out["norm"] = {"kind": norm.kind, "placement": block.placement, "eps": float(norm.eps)}
        for key in ("ln1", "ln2"):
            if getattr(block, key) is not None:
                out[key] = _norm(getattr(block, key), f"{where}.{key}", sidecar)
    if block.mlp is not None:
        mlp: Dict[str, Any] = {"activation": block.mlp.activation, "layout": block.mlp.layout}
        for name, array in block.mlp.weights.items():
            mlp[name] = sidecar.ref(f"{where}.mlp.{name}", array)
        out["mlp"] = mlp
    if not block.residual:
        out["residual"] = False
    return out


def write_spec(spec, path: Path, protected=()) -> Path:
    """Write `spec` to `path` (YAML) and its arrays to a sidecar .safetensors beside it; returns the sidecar."""
    path = Path(path)
    sidecar_path = path.with_suffix(".safetensors")
    for target, what in ((path, "-o"), (sidecar_path, "the sidecar of -o")):
        refuse_inputs(target, protected, f"{what} {target}")
    sidecar = _Sidecar(sidecar_path.name)
    document = spec_document(spec, sidecar)
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    write_all([(sidecar_path, lambda stream: [stream.write(chunk) for chunk in safetensors_bytes(
                   sidecar.tensors, {"written_by": "attntrace import-model"})]),
               (path, lambda stream: stream.write(text.encode("utf-8")))])    # both or neither
    return sidecar_path
