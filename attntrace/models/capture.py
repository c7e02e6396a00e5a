"""Capture one forward pass of a PyTorch attention module into a safetensors file.

    with attntrace.capture(mha, "run.safetensors"):
        mha(x, x, x)

records the module's inputs, weights, outputs and configuration (and every
tensor the user marks with :func:`tap`) so that ``attntrace check`` can rebuild
the same attention as a spec, run attntrace's reference trace on the same
numbers and compare hook by hook (:mod:`attntrace.analysis.capture`).

torch is imported inside functions only: ``import attntrace`` never needs it,
and :func:`tap` outside a capture is a no-op that touches no torch code.

Supported without changes to the user's code (forward hooks and pre-hooks):
``torch.nn.MultiheadAttention``, ``torch.nn.TransformerEncoderLayer`` and
``TransformerDecoderLayer`` (their attention sub-layers as parts, plus every
weight and the input/output of every norm and linear for the blocks that come
later), and the Hugging Face attention modules of BERT (``BertSelfAttention``,
``BertAttention``), GPT-2 (``GPT2Attention``) and Llama-like models
(``LlamaAttention`` and its copies: q/k/v/o_proj, head_dim, GQA).  Any other
module works with ``tap`` calls in its forward plus ``weights=``, ``heads=``
(and ``layout=``, ``kv_heads=``, ``mask=``, ``scale=``) given to :func:`capture`.

The file format (version 1)
---------------------------
A safetensors file: 8-byte little-endian header length, a JSON header with one
entry per tensor (dtype, shape, byte offsets) and ``__metadata__``, then the raw
bytes.  ``__metadata__["attntrace.capture"]`` holds a JSON document::

    {"format": "attntrace-capture", "version": 1, "producer": {...}, "name": ...,
     "device": "cpu", "dtype": "float32",
     "components": [ {"name": "", "kind": "mha" | "tapped" | "encoder-layer" | "decoder-layer"
                                       | "hf-bert-self" | "hf-bert-attention" | "hf-gpt2" | "hf-llama",
                      "class": "torch.nn.modules.activation.MultiheadAttention",
                      "config":    {...kind-specific: heads, kv_heads, d_head, layout, batch_first, biases,
                                    masks and their convention, is_causal, scale, norm_first ...},
                      "inputs":    {forward argument: tensor key},
                      "arguments": {forward argument: JSON value (non-tensors)},
                      "weights":   {parameter name: tensor key},
                      "outputs":   {"0": tensor key, "1": ...},
                      "modules":   {child: {"class": ..., "inputs": {"0": key}, "outputs": {"0": key}}},
                      "hooks":     {hook name: {"tensor": key, "axes": [...] | null, "reduce": null | "mean_heads",
                                                "slice": null | [axis, start, stop], "source": "tap" | "output"
                                                | "module", "written_as": name}},
                      "parts":     [names of attention components inside a block],
                      "calls": 1},
                    ...],
     "tensors": {key: {"shape": [...], "dtype": "float32", "device": "cuda:0", "role": "input" | ...}},
     "notes": [{"code": "ATT-W34x", "message": ..., "hint": ...}]}

Axes are attntrace's axis names (``batch``, ``seq_q``, ``seq_k``, ``n_heads``,
``n_kv_heads``, ``d_head``, ``d_v``, ``d_model``, ``d_out``, products such as
``n_heads·d_head`` and ``batch·n_heads``).  Tapped tensors keep the layout the
user's code holds them in; ``axes`` is null unless given to :func:`tap`, and the
checker then infers it from the shape.  Block components (encoder/decoder
layers) record everything a rebuild of norms, MLP and residuals needs; their
``hooks`` use the block hook names (``blocks.0.ln1.hook_normalized`` ...).

Memory: tensors are detached, never copied while recording, and written from
their device one chunk at a time (64 MiB), so a capture of a layer on a GPU
needs one chunk of host memory, not a host copy of every tensor.  (The
safetensors package's ``save_file`` moves every tensor to the host before it
writes; that is why this module writes the format itself.  The tests read its
files with ``safetensors.safe_open`` to prove the format.)
"""
from __future__ import annotations

import inspect
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from attntrace.errors import InputError, input_error

FORMAT_NAME = "attntrace-capture"
FORMAT_VERSION = 1
METADATA_KEY = "attntrace.capture"
CHUNK_BYTES = 64 << 20                   # bytes moved to the host and written at a time

# torch dtype name -> safetensors dtype code
DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
WEIGHT_KEYS = ("W_q", "W_k", "W_v", "W_o", "b_q", "b_k", "b_v", "b_o", "W_qkv", "b_qkv")
SHORT_WEIGHTS = ("q", "k", "v", "o", "qkv")      # a module (nn.Linear / HF Conv1D) for W_x and b_x
MASK_KINDS = ("none", "causal")
MASK_CONVENTIONS = ("keep", "ignore", "additive")
MASK_ARGUMENT_NAMES = ("mask", "attn_mask", "attention_mask", "key_padding_mask", "src_mask", "padding_mask")
LAYOUTS = ("linear", "x_at_w")

_ACTIVE: List[Capture] = []           # captures in progress, innermost last


# =========================================================================== tap

def tap(name: str, tensor, *, axes=None):
    """Mark `tensor` as hook point `name` (``attn.hook_pattern``, or an alias such as
    ``weights``) inside your own forward.  Returns `tensor` unchanged, so it can be
    used inline: ``w = tap("weights", softmax(s, -1))``.  Outside a capture it does
    nothing.  `axes` names the tensor's axes when its shape alone cannot say, e.g.
    ``axes=("batch", "n_heads", "seq_q", "d_head")`` (``heads``, ``seq``, ``query``,
    ``key``, ``d_k`` are understood too)."""
    if _ACTIVE:
        _ACTIVE[-1].record_tap(name, tensor, axes)
    return tensor


def capture(module, path, *, weights: Optional[Dict[str, Any]] = None, layout: Optional[str] = None,
            heads: Optional[int] = None, kv_heads: Optional[int] = None, mask=None, scale=None,
            name: Optional[str] = None) -> Capture:
    """A context manager that records ONE forward pass of `module` into the capture file `path`.

    For torch.nn.MultiheadAttention, TransformerEncoderLayer/DecoderLayer and the
    Hugging Face BERT, GPT-2 and Llama-like attention modules everything is read
    from the module.  For any other module pass what it is:
    ``weights={"q": self.Wq, "k": ..., "v": ..., "o": ...}`` (nn.Linear modules, or
    tensors under W_q/b_q/...; ``qkv`` for a fused projection), ``heads=``,
    optionally ``kv_heads=``, ``layout=`` ("linear": nn.Linear (out, in) weights;
    "x_at_w": Q = X @ W_q), ``mask=`` ("none", "causal", the convention of the
    forward's mask argument "keep" | "ignore" | "additive", or a mask tensor with
    True = may attend) and ``scale=`` (a number that multiplies Q·Kᵀ, "none", or
    "auto" = 1/√d_head).  The file is written when the block ends without an error.
    """
    return Capture(module, path, weights=weights, layout=layout, heads=heads, kv_heads=kv_heads, mask=mask,
                   scale=scale, name=name)


def _capture_error(message: str, hint: Optional[str] = None, code: str = "ATT-E340") -> InputError:
    return input_error(code, f"attntrace.capture: {message}", hint=hint)


# =========================================================================== module kinds

def _class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _has(module, *names: str) -> bool:
    return all(hasattr(module, n) for n in names)


def _is_bert_self(module) -> bool:
    return _has(module, "query", "key", "value", "num_attention_heads", "attention_head_size")


def detect_kind(module) -> str:
    """Which recorder handles `module`: by class for torch, by structure for Hugging Face
    (so copies such as RobertaSelfAttention or MistralAttention are recognised too)."""
    import torch.nn as nn
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.TransformerEncoderLayer):
        return "encoder-layer"
    if isinstance(module, nn.TransformerDecoderLayer):
        return "decoder-layer"
    if _has(module, "self", "output") and _is_bert_self(module.self) and _has(module.output, "dense", "LayerNorm"):
        return "hf-bert-attention"
    if _is_bert_self(module):
        return "hf-bert-self"
    if _has(module, "c_attn", "c_proj", "num_heads", "head_dim", "split_size"):
        return "hf-gpt2"
    if _has(module, "q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups"):
        return "hf-llama"
    return "tapped"


# =========================================================================== recording

def _json_value(value):
    """A forward argument that is not a tensor, as JSON (its repr when it is not plain data)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return repr(value)[:200]


def _bind(function, args, kwargs) -> Dict[str, Any]:
    """Forward arguments by parameter name (defaults filled in); **kwargs are flattened."""
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        named = {f"arg{i}": a for i, a in enumerate(args)}
        named.update(kwargs)
        return named
    named: Dict[str, Any] = {}
    params = inspect.signature(function).parameters
    for key, value in bound.arguments.items():
        kind = params[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"{key}{i}": v for i, v in enumerate(value)})
        else:
            named[key] = value
    return named


class _Store:
    """The tensors of one capture, each stored once (by identity), in recording order."""

    def __init__(self):
        self.tensors: Dict[str, Any] = {}        # key -> detached tensor
        self.versions: Dict[str, int] = {}       # key -> version counter when recorded
        self.roles: Dict[str, str] = {}
        self.by_identity: Dict[int, str] = {}
        self.keep_alive: List[Any] = []

    def add(self, key: str, tensor, role: str) -> str:
        existing = self.by_identity.get(id(tensor))
        if existing is not None:
            return existing
        if tensor.is_sparse or tensor.is_complex() or str(tensor.dtype).split(".")[-1] not in DTYPE_CODES:
            raise _capture_error(f"{role} tensor '{key}' has dtype {tensor.dtype}, which a capture cannot hold",
                                 hint="capture float64/32/16, bfloat16, integer or bool tensors", code="ATT-E343")
        while key in self.tensors:                # a second tensor under the same name
            key += "_"
        self.keep_alive.append(tensor)           # ids stay unique while we hold the object
        self.by_identity[id(tensor)] = key
        self.tensors[key] = tensor.detach()
        self.versions[key] = tensor._version
        self.roles[key] = role
        return key


class _Component:
    """What one module (the captured one, or an attention part inside a block) recorded."""

    def __init__(self, capture: Capture, name: str, kind: str, module):
        self.capture, self.name, self.kind, self.module = capture, name, kind, module
        self.record: Dict[str, Any] = {"name": name, "kind": kind, "class": _class_path(module), "config": {},
                                       "inputs": {}, "arguments": {}, "weights": {}, "outputs": {},
                                       "modules": {}, "hooks": {}, "parts": [], "calls": 0}
        self.call_tensors: Dict[str, Any] = {}     # forward argument -> tensor, for the finisher

    def key(self, section: str, label: str) -> str:
        return f"{self.name + '/' if self.name else ''}{section}.{label}"

    def add(self, section: str, label: str, tensor, role: str) -> str:
        return self.capture.store.add(self.key(section, label), tensor, role)

    def add_weights(self, module, prefix: str = "") -> None:
        for pname, param in module.named_parameters():
            self.record["weights"][prefix + pname] = self.add("weights", prefix + pname, param, "weight")

    def record_inputs(self, function, args, kwargs) -> None:
        import torch
        for pname, value in _bind(function, args, kwargs).items():
            if isinstance(value, torch.Tensor):
                self.record["inputs"][pname] = self.add("inputs", pname, value, "input")
                self.call_tensors[pname] = value
            elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
                for i, item in enumerate(value):     # e.g. Llama's position_embeddings = (cos, sin)
                    self.record["inputs"][f"{pname}.{i}"] = self.add("inputs", f"{pname}.{i}", item, "input")
                    self.call_tensors[f"{pname}.{i}"] = item
            else:
                self.record["arguments"][pname] = _json_value(value)

    def record_outputs(self, output) -> None:
        import torch
        items = output if isinstance(output, (tuple, list)) else (output,)
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                self.record["outputs"][str(i)] = self.add("outputs", str(i), item, "output")

    def watch(self, function: Callable) -> None:
        """Record the first call of this component's module (inputs, outputs)."""
        def before(module, args, kwargs):
            self.record["calls"] += 1
            if self.record["calls"] == 1:
                self.record_inputs(function, args, kwargs)

        def after(module, args, kwargs, output):
            if self.record["calls"] == 1 and not self.record["outputs"]:
                self.record_outputs(output)
        self.capture.hold(self.module.register_forward_pre_hook(before, with_kwargs=True))
        self.capture.hold(self.module.register_forward_hook(after, with_kwargs=True))

    def watch_child(self, label: str, child) -> None:
        """Record the first call of a sub-module (a projection, a norm) by position."""
        import torch
        entry = {"class": _class_path(child), "inputs": {}, "outputs": {}}

        def before(module, args):
            if not entry["inputs"]:
                for i, a in enumerate(args):
                    if isinstance(a, torch.Tensor):
                        entry["inputs"][str(i)] = self.add("modules", f"{label}.in{i}", a, "module input")

        def after(module, args, output):
            if not entry["outputs"]:
                items = output if isinstance(output, (tuple, list)) else (output,)
                for i, o in enumerate(items):
                    if isinstance(o, torch.Tensor):
                        entry["outputs"][str(i)] = self.add("modules", f"{label}.out{i}", o, "module output")
        self.record["modules"][label] = entry
        self.capture.hold(child.register_forward_pre_hook(before))
        self.capture.hold(child.register_forward_hook(after))

    def hook(self, hook: str, tensor_key: Optional[str], axes, source: str, reduce: Optional[str] = None,
             part: Optional[Tuple[int, int, int]] = None) -> None:
        if tensor_key is not None and hook not in self.record["hooks"]:
            self.record["hooks"][hook] = {"tensor": tensor_key, "axes": list(axes) if axes else None,
                                          "reduce": reduce, "slice": list(part) if part else None,
                                          "source": source, "written_as": hook}

    def module_tensor(self, label: str, side: str = "outputs", index: str = "0") -> Optional[str]:
        return self.record["modules"].get(label, {}).get(side, {}).get(index)


# =========================================================================== per kind

def _mask_info(tensor) -> Optional[Dict[str, Any]]:
    if tensor is None:
        return None
    # nn.MultiheadAttention takes bool masks (True = blocked) or float masks (added to the scores)
    convention = "additive" if tensor.dtype.is_floating_point else "ignore"
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).split(".")[-1], "convention": convention}


def _setup_mha(comp: _Component) -> None:
    comp.add_weights(comp.module)
    comp.watch(comp.module.forward)


def _finish_mha(comp: _Component) -> None:
    m, rec = comp.module, comp.record
    args = rec["arguments"]
    query = comp.call_tensors.get("query")
    batched = query is not None and query.dim() == 3
    rec["config"] = {
        "embed_dim": m.embed_dim, "kdim": m.kdim, "vdim": m.vdim, "heads": m.num_heads, "kv_heads": m.num_heads,
        "d_head": m.head_dim, "layout": "linear", "batch_first": bool(m.batch_first), "batched": batched,
        "packed_in_proj": bool(m._qkv_same_embed_dim), "bias": m.in_proj_bias is not None,
        "out_bias": m.out_proj.bias is not None, "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": bool(m.add_zero_attn), "dropout": float(m.dropout), "training": bool(m.training),
        "need_weights": bool(args.get("need_weights", True)),
        "average_attn_weights": bool(args.get("average_attn_weights", True)),
        "is_causal": bool(args.get("is_causal", False)), "scale": m.head_dim ** -0.5,
        # nn.MultiheadAttention: bool masks are True = blocked ("ignore"); float masks are added ("additive")
        "masks": {name: _mask_info(comp.call_tensors.get(name)) for name in ("key_padding_mask", "attn_mask")},
    }
    seq_batch = ["batch", "seq_q"] if m.batch_first else ["seq_q", "batch"]
    out_axes = (seq_batch if batched else ["seq_q"]) + ["d_out"]
    comp.hook("hook_attn_out", rec["outputs"].get("0"), out_axes, "output")
    averaged = rec["config"]["average_attn_weights"]
    pattern_axes = (["batch"] if batched else []) + ([] if averaged else ["n_heads"]) + ["seq_q", "seq_k"]
    comp.hook("attn.hook_pattern", rec["outputs"].get("1"), pattern_axes, "output",
              reduce="mean_heads" if averaged else None)
    if m.training and m.dropout > 0:
        comp.capture.note("ATT-W340", f"{comp.name or 'the module'} ran in training mode with dropout "
                                      f"{m.dropout:g}: its numbers are random",
                          "call module.eval() before capturing")


def _setup_layer(comp: _Component) -> None:
    m = comp.module
    comp.add_weights(m)
    comp.watch(m.forward)
    parts = ["self_attn"] + (["multihead_attn"] if comp.kind == "decoder-layer" else [])
    for part in parts:
        child = _Component(comp.capture, part, "mha", getattr(m, part))
        comp.capture.components.append(child)
        _setup_mha(child)
        comp.record["parts"].append(part)
    norms = ("norm1", "norm2", "norm3") if comp.kind == "decoder-layer" else ("norm1", "norm2")
    for label in norms + ("linear1", "linear2"):
        comp.watch_child(label, getattr(m, label))
    comp.capture.disable_fastpath()


def _finish_layer(comp: _Component) -> None:
    m, rec = comp.module, comp.record
    activation = getattr(m, "activation", None)
    rec["config"] = {
        "d_model": m.self_attn.embed_dim, "heads": m.self_attn.num_heads, "dim_feedforward": m.linear1.out_features,
        "norm_first": bool(m.norm_first), "batch_first": bool(m.self_attn.batch_first),
        "activation": getattr(activation, "__name__", type(activation).__name__),
        "layer_norm_eps": float(m.norm1.eps), "bias": m.linear1.bias is not None,
        "dropout": float(m.dropout.p), "training": bool(m.training), "parts": list(rec["parts"]),
        "fastpath_disabled": True, "comparable": False,
    }
    for part in _finish_parts(comp):
        _finish_mha(part)
    # block hook names for the rebuild of norms, MLP and residuals (DESIGN.md), where unambiguous
    first_input = "src" if comp.kind == "encoder-layer" else "tgt"
    source = comp.call_tensors.get(first_input)
    seq_batch = ["batch", "seq_q"] if m.self_attn.batch_first else ["seq_q", "batch"]
    lead = seq_batch if source is not None and source.dim() == 3 else ["seq_q"]
    model, mlp = lead + ["d_model"], lead + ["d_mlp"]
    comp.hook("blocks.0.hook_resid_pre", rec["inputs"].get(first_input), model, "input")
    comp.hook("blocks.0.mlp.hook_pre", comp.module_tensor("linear1"), mlp, "module")
    comp.hook("blocks.0.mlp.hook_post", comp.module_tensor("linear2", "inputs"), mlp, "module")
    comp.hook("blocks.0.hook_mlp_out", comp.module_tensor("linear2"), model, "module")
    comp.hook("blocks.0.hook_resid_post", rec["outputs"].get("0"), model, "output")
    if m.norm_first:
        comp.hook("blocks.0.ln1.hook_normalized", comp.module_tensor("norm1"), model, "module")
        if comp.kind == "encoder-layer":      # a decoder has a cross-attention between its residuals
            comp.hook("blocks.0.hook_resid_mid", comp.module_tensor("norm2", "inputs"), model, "module")


def _finish_parts(comp: _Component) -> List[_Component]:
    return [c for c in comp.capture.components if c.name in comp.record["parts"]]


def _hf_common_config(m, comp: _Component) -> Dict[str, Any]:
    config = getattr(m, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    training = bool(m.training)
    return {"attn_implementation": implementation, "training": training, "is_causal": bool(getattr(m, "is_causal",
                                                                                                  False)),
            "layout": "linear", "model_type": getattr(config, "model_type", None),
            "cache": any(comp.record["arguments"].get(k) is not None for k in ("cache", "past_key_values")),
            "attention_mask": _hf_mask_info(comp.call_tensors.get("attention_mask"))}


def _hf_mask_info(tensor) -> Optional[Dict[str, Any]]:
    if tensor is None:
        return None
    kind = "bool" if str(tensor.dtype) == "torch.bool" else ("float" if tensor.dtype.is_floating_point else "int")
    # Hugging Face: bool masks say True = may attend (sdpa), float masks are added (eager),
    # integer masks are the tokenizer's 1 = real token
    convention = {"bool": "keep", "float": "additive", "int": "keep"}[kind]
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).split(".")[-1], "convention": convention}


_FLAT_Q = ["batch", "seq_q", "n_heads·d_head"]
_FLAT_K = ["batch", "seq_k", "n_kv_heads·d_head"]
_FLAT_V = ["batch", "seq_k", "n_kv_heads·d_v"]
_PATTERN = ["batch", "n_heads", "seq_q", "seq_k"]
_OUT = ["batch", "seq_q", "d_out"]
_CONCAT = ["batch", "seq_q", "n_heads·d_v"]


def _setup_bert(comp: _Component) -> None:
    m = comp.module
    comp.add_weights(m)
    comp.watch(m.forward)
    inner = m.self if comp.kind == "hf-bert-attention" else m
    prefix = "self." if comp.kind == "hf-bert-attention" else ""
    for label in ("query", "key", "value"):
        comp.watch_child(prefix + label, getattr(inner, label))
    if comp.kind == "hf-bert-attention":
        comp.watch_child("output.dense", m.output.dense)
        comp.watch_child("output.LayerNorm", m.output.LayerNorm)


def _finish_bert(comp: _Component) -> None:
    m, rec = comp.module, comp.record
    inner = m.self if comp.kind == "hf-bert-attention" else m
    prefix = "self." if comp.kind == "hf-bert-attention" else ""
    rec["config"] = dict(_hf_common_config(inner, comp), heads=inner.num_attention_heads,
                         kv_heads=inner.num_attention_heads, d_head=inner.attention_head_size,
                         scale=float(getattr(inner, "scaling", inner.attention_head_size ** -0.5)),
                         dropout=float(inner.dropout.p), weight_prefix=prefix,
                         has_w_o=comp.kind == "hf-bert-attention",
                         cross="encoder_hidden_states" in rec["inputs"])
    comp.hook("attn.hook_q", comp.module_tensor(prefix + "query"), _FLAT_Q, "module")
    comp.hook("attn.hook_k", comp.module_tensor(prefix + "key"), _FLAT_K, "module")
    comp.hook("attn.hook_v", comp.module_tensor(prefix + "value"), _FLAT_V, "module")
    comp.hook("attn.hook_pattern", rec["outputs"].get("1"), _PATTERN, "output")
    if comp.kind == "hf-bert-attention":
        comp.hook("attn.hook_z_concat", comp.module_tensor("output.dense", "inputs"), _CONCAT, "module")
        comp.hook("hook_attn_out", comp.module_tensor("output.dense"), _OUT, "module")
        rec["config"]["block_after_attention"] = "dropout, residual, LayerNorm (BertSelfOutput)"
    else:
        comp.hook("hook_attn_out", rec["outputs"].get("0"), _OUT, "output")
    _note_hf_training(comp, inner)


def _note_hf_training(comp: _Component, module) -> None:
    config = getattr(module, "config", None)
    p = getattr(config, "attention_probs_dropout_prob", getattr(config, "attn_pdrop",
                                                                 getattr(config, "attention_dropout", 0.0)))
    if module.training and p:
        comp.capture.note("ATT-W340", f"{type(module).__name__} ran in training mode with attention dropout "
                                      f"{p:g}: its numbers are random", "call module.eval() before capturing")


def _setup_gpt2(comp: _Component) -> None:
    m = comp.module
    comp.add_weights(m)
    comp.watch(m.forward)
    for label in ("c_attn", "c_proj") + (("q_attn",) if hasattr(m, "q_attn") else ()):
        comp.watch_child(label, getattr(m, label))


def _finish_gpt2(comp: _Component) -> None:
    m, rec = comp.module, comp.record
    cross = "encoder_hidden_states" in rec["inputs"]
    d = m.split_size
    rec["config"] = dict(_hf_common_config(m, comp), heads=m.num_heads, kv_heads=m.num_heads, d_head=m.head_dim,
                         scale=float(m.scaling), layout="x_at_w", cross=cross, split_size=d,
                         reorder_and_upcast_attn=bool(m.reorder_and_upcast_attn))
    if cross:
        rec["config"]["attention_mask"] = _hf_mask_info(comp.call_tensors.get("encoder_attention_mask"))
        comp.hook("attn.hook_q", comp.module_tensor("q_attn"), _FLAT_Q, "module")
        comp.hook("attn.hook_k", comp.module_tensor("c_attn"), _FLAT_K, "module", part=(-1, 0, d))
        comp.hook("attn.hook_v", comp.module_tensor("c_attn"), _FLAT_V, "module", part=(-1, d, 2 * d))
    else:     # c_attn gives [q | k | v] side by side (GPT-2's Conv1D: x @ W + b)
        for i, (hook, axes) in enumerate((("attn.hook_q", _FLAT_Q), ("attn.hook_k", _FLAT_K),
                                          ("attn.hook_v", _FLAT_V))):
            comp.hook(hook, comp.module_tensor("c_attn"), axes, "module", part=(-1, i * d, (i + 1) * d))
    comp.hook("attn.hook_pattern", rec["outputs"].get("1"), _PATTERN, "output")
    comp.hook("attn.hook_z_concat", comp.module_tensor("c_proj", "inputs"), _CONCAT, "module")
    comp.hook("hook_attn_out", comp.module_tensor("c_proj"), _OUT, "module")
    _note_hf_training(comp, m)


def _setup_llama(comp: _Component) -> None:
    m = comp.module
    comp.add_weights(m)
    comp.watch(m.forward)
    for label in ("q_proj", "k_proj", "v_proj", "o_proj"):
        comp.watch_child(label, getattr(m, label))


def _finish_llama(comp: _Component) -> None:
    m, rec = comp.module, comp.record
    config = getattr(m, "config", None)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0),
                                                        "rope_type": "default"}
    heads = m.q_proj.out_features // m.head_dim
    rec["config"] = dict(_hf_common_config(m, comp), heads=heads, kv_heads=heads // m.num_key_value_groups,
                         d_head=m.head_dim, scale=float(m.scaling),
                         rope_parameters={k: _json_value(v) for k, v in dict(rope).items()},
                         sliding_window=getattr(config, "sliding_window", None),
                         position_embeddings=["inputs.position_embeddings.0", "inputs.position_embeddings.1"])
    comp.hook("attn.hook_q", comp.module_tensor("q_proj"), _FLAT_Q, "module")
    comp.hook("attn.hook_k", comp.module_tensor("k_proj"), _FLAT_K, "module")
    comp.hook("attn.hook_v", comp.module_tensor("v_proj"), _FLAT_V, "module")
    comp.hook("attn.hook_pattern", rec["outputs"].get("1"), _PATTERN, "output")
    comp.hook("attn.hook_z_concat", comp.module_tensor("o_proj", "inputs"), _CONCAT, "module")
    comp.hook("hook_attn_out", comp.module_tensor("o_proj"), _OUT, "module")
    _note_hf_training(comp, m)


def _setup_tapped(comp: _Component) -> None:
    comp.watch(comp.module.forward)


def _finish_tapped(comp: _Component) -> None:
    rec, options = comp.record, comp.capture.options
    tensor_params = [p for p in rec["inputs"] if not _is_mask_argument(p)]
    mask_params = [p for p in rec["inputs"] if _is_mask_argument(p)]
    roles = dict(zip(("query", "key", "value"), tensor_params))
    config: Dict[str, Any] = {"heads": options["heads"], "kv_heads": options["kv_heads"],
                              "layout": options["layout"], "scale": options["scale"], "roles": roles,
                              "weights": dict(comp.capture.user_weight_keys)}
    mask = options["mask"]
    if isinstance(mask, dict):
        config["mask"] = {k: v for k, v in mask.items() if k != "tensors"}
    elif mask in MASK_KINDS:
        config["mask"] = {"kind": mask}
    elif mask in MASK_CONVENTIONS or mask is None:
        if mask_params:
            convention = mask or "keep"
            if mask is None:
                comp.capture.note("ATT-W343", f"the forward's mask argument '{mask_params[0]}' was read as "
                                              "1/True = may attend (convention keep)",
                                  "say it: capture(..., mask='keep' | 'ignore' | 'additive')")
            config["mask"] = {"kind": "argument", "argument": mask_params[0], "convention": convention,
                              "tensor": rec["inputs"][mask_params[0]]}
        else:
            config["mask"] = {"kind": "none"}
    dropout = [m.p for m in comp.module.modules() if "Dropout" in type(m).__name__ and getattr(m, "p", 0)]
    if comp.module.training and dropout:
        comp.capture.note("ATT-W340", f"{type(comp.module).__name__} ran in training mode with dropout "
                                      f"{max(dropout):g}: its numbers are random",
                          "call module.eval() before capturing")
    if options["layout_assumed"]:
        comp.capture.note("ATT-W343", "weights given as tensors were read as nn.Linear weights (out, in)",
                          "say it: capture(..., layout='linear') or layout='x_at_w' for Q = X @ W_q")
    rec["config"] = config


def _is_mask_argument(name: str) -> bool:
    return name in MASK_ARGUMENT_NAMES or name.endswith("mask")


_RECORDERS: Dict[str, Tuple[Callable, Callable]] = {
    "mha": (_setup_mha, _finish_mha), "encoder-layer": (_setup_layer, _finish_layer),
    "decoder-layer": (_setup_layer, _finish_layer), "hf-bert-self": (_setup_bert, _finish_bert),
    "hf-bert-attention": (_setup_bert, _finish_bert), "hf-gpt2": (_setup_gpt2, _finish_gpt2),
    "hf-llama": (_setup_llama, _finish_llama), "tapped": (_setup_tapped, _finish_tapped),
}


# =========================================================================== user options

def _normalise_options(kind: str, weights, layout, heads, kv_heads, mask, scale) -> Dict[str, Any]:
    """Check capture()'s keyword arguments before anything runs (clean errors, no traceback)."""
    given = {k: v for k, v in (("weights", weights), ("layout", layout), ("heads", heads),
                               ("kv_heads", kv_heads), ("mask", mask), ("scale", scale)) if v is not None}
    if kind != "tapped" and given:
        raise _capture_error(f"{', '.join(given)} cannot be given for a {kind} module: its configuration "
                             "is read from the module itself", hint="drop those arguments")
    for label, value in (("heads", heads), ("kv_heads", kv_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _capture_error(f"{label} must be a whole number ≥ 1, got {value!r}")
    if layout is not None and layout not in LAYOUTS:
        raise _capture_error(f"layout must be 'linear' or 'x_at_w', got {layout!r}",
                             hint="linear: nn.Linear weights (out, in); x_at_w: Q = X @ W_q with W_q (in, out)")
    if scale is not None and scale not in ("auto", "none"):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise _capture_error(f"scale must be 'auto', 'none' or a positive number, got {scale!r}",
                                 hint="the number multiplies Q·Kᵀ, as PyTorch's scale=: 1/math.sqrt(d_head)")
    if isinstance(mask, str) and mask not in MASK_KINDS + MASK_CONVENTIONS:
        raise _capture_error(f"mask must be one of {', '.join(MASK_KINDS + MASK_CONVENTIONS)}, a tensor "
                             f"(True = may attend) or a mapping; got {mask!r}")
    return {"heads": heads, "kv_heads": kv_heads, "layout": layout, "scale": scale if scale is not None else "auto",
            "mask": mask, "layout_assumed": False, "weights": weights}


def _weight_tensors(weights, layout: Optional[str]) -> Tuple[Dict[str, Any], Optional[str], bool]:
    """`weights=` as {W_q: tensor, ...}; modules give W_x and b_x and imply the layout."""
    import torch
    if weights is None:
        return {}, layout, False
    if not isinstance(weights, dict):
        raise _capture_error(f"weights must be a mapping such as {{'q': module.Wq, ...}}, got "
                             f"{type(weights).__name__}")
    tensors: Dict[str, Any] = {}
    implied = set()
    for key, value in weights.items():
        if key in SHORT_WEIGHTS and isinstance(value, torch.nn.Module):
            weight, bias = getattr(value, "weight", None), getattr(value, "bias", None)
            if not isinstance(weight, torch.Tensor):
                raise _capture_error(f"weights['{key}'] is a {type(value).__name__} without a weight tensor",
                                     hint="pass nn.Linear modules or tensors")
            implied.add("x_at_w" if type(value).__name__ == "Conv1D" else "linear")
            tensors[f"W_{key}"] = weight
            if isinstance(bias, torch.Tensor):
                tensors[f"b_{key}"] = bias
        elif key in WEIGHT_KEYS or key in SHORT_WEIGHTS:
            name = key if key in WEIGHT_KEYS else f"W_{key}"
            if not isinstance(value, torch.Tensor):
                try:
                    value = torch.as_tensor(value)
                except Exception:
                    raise _capture_error(f"weights['{key}'] is not a tensor (got {type(value).__name__})") from None
            tensors[name] = value
        else:
            import difflib
            close = difflib.get_close_matches(str(key), WEIGHT_KEYS + SHORT_WEIGHTS, n=1)
            raise _capture_error(f"unknown weights key '{key}'",
                                 hint=f"did you mean '{close[0]}'?" if close else
                                 f"keys: {', '.join(WEIGHT_KEYS)}, or q/k/v/o/qkv with an nn.Linear")
    if len(implied) > 1:
        raise _capture_error("weights mixes nn.Linear (out, in) and Conv1D (in, out) modules",
                             hint="give tensors and say layout=")
    if implied and layout is not None and layout not in implied:
        raise _capture_error(f"layout={layout!r} but the weights are {implied.pop()} modules")
    assumed = layout is None and not implied and bool(tensors)
    return tensors, layout or (implied.pop() if implied else "linear"), assumed


# =========================================================================== the context manager

class Capture:
    """Records one forward pass; see :func:`capture`."""

    def __init__(self, module, path, *, weights=None, layout=None, heads=None, kv_heads=None, mask=None,
                 scale=None, name=None):
        try:
            import torch
        except ImportError:
            raise _capture_error("needs PyTorch (pip install torch)") from None
        if not isinstance(module, torch.nn.Module):
            raise _capture_error(f"the first argument must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise _capture_error(f"the path must be a file name, got {path!r}")
        self.module, self.path, self.name = module, Path(path), name
        self.kind = detect_kind(module)
        self.options = _normalise_options(self.kind, weights, layout, heads, kv_heads, mask, scale)
        self.store = _Store()
        self.components: List[_Component] = []
        self.notes: List[Dict[str, Any]] = []
        self.user_weight_keys: Dict[str, str] = {}
        self._handles: List[Any] = []
        self._fastpath: Optional[bool] = None
        self._tap_counts: Dict[str, int] = {}

    # -- helpers used by the recorders -----------------------------------
    def hold(self, handle) -> None:
        self._handles.append(handle)

    def note(self, code: str, message: str, hint: Optional[str] = None) -> None:
        if not any(n["code"] == code and n["message"] == message for n in self.notes):
            self.notes.append({"code": code, "message": message, "hint": hint})

    def disable_fastpath(self) -> None:
        """Layers take a fused fast path in eval mode that skips their sub-modules (and so our
        hooks); the capture runs the ordinary path, which computes the same numbers."""
        import torch
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and self._fastpath is None:
            self._fastpath = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)

    @property
    def root(self) -> _Component:
        return self.components[0]

    # -- taps ---------------------------------------------------------------
    def record_tap(self, name: str, tensor, axes) -> None:
        import torch
        if not isinstance(name, str) or not name.strip():
            raise _capture_error(f"tap() needs a hook name such as 'attn.hook_pattern', got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise _capture_error(f"tap('{name}', ...) needs a torch.Tensor, got {type(tensor).__name__}")
        if axes is not None:
            axes = axes.split() if isinstance(axes, str) else list(axes)
            if len(axes) != tensor.dim():
                raise _capture_error(f"tap('{name}', axes={axes}) names {len(axes)} axes but the tensor has "
                                     f"{tensor.dim()} {tuple(tensor.shape)}", code="ATT-E353")
        self._tap_counts[name] = self._tap_counts.get(name, 0) + 1
        if self._tap_counts[name] > 1:
            self.note("ATT-W342", f"'{name}' was tapped {self._tap_counts[name]} times; the first is kept",
                      "tap each hook once per forward (tap per-head tensors after stacking them)")
            return
        key = self.store.add(f"taps.{name}", tensor, "tap")
        hooks = self.root.record["hooks"]
        hooks[name] = {"tensor": key, "axes": axes, "reduce": None, "slice": None, "source": "tap",
                       "written_as": name}

    # -- the context ----------------------------------------------------------
    def __enter__(self) -> Capture:
        root = _Component(self, "", self.kind, self.module)
        self.components.append(root)
        try:
            if self.kind == "tapped":
                tensors, layout, assumed = _weight_tensors(self.options["weights"], self.options["layout"])
                self.options["layout"], self.options["layout_assumed"] = layout, assumed
                for key, tensor in tensors.items():
                    self.user_weight_keys[key] = root.add("weights", key, tensor, "weight")
                self._user_mask_tensors(root)
            _RECORDERS[self.kind][0](root)
        except Exception:
            self._release()
            raise
        _ACTIVE.append(self)
        return self

    def _user_mask_tensors(self, root: _Component) -> None:
        """mask= given as a tensor or a mapping with tensors: store them, keep the rest as config."""
        import torch
        mask = self.options["mask"]
        if mask is None or isinstance(mask, str):
            return
        if isinstance(mask, dict):
            unknown = set(mask) - {"causal", "matrix", "padding", "convention"}
            if unknown:
                raise _capture_error(f"mask mapping has unknown key(s) {sorted(unknown)}",
                                     hint="keys: causal, matrix, padding, convention")
            entry: Dict[str, Any] = {"kind": "given", "causal": bool(mask.get("causal", False)),
                                     "convention": mask.get("convention", "keep")}
            if entry["convention"] not in MASK_CONVENTIONS:
                raise _capture_error(f"mask convention must be one of {', '.join(MASK_CONVENTIONS)}")
            for part in ("matrix", "padding"):
                if mask.get(part) is not None:
                    entry[part] = root.add("inputs", f"mask.{part}", torch.as_tensor(mask[part]), "mask")
            self.options["mask"] = entry
            return
        try:
            tensor = torch.as_tensor(mask)
        except Exception:
            raise _capture_error(f"mask must be a string, a tensor or a mapping, got {type(mask).__name__}") from None
        self.options["mask"] = {"kind": "given", "causal": False, "convention": "keep",
                                "matrix": root.add("inputs", "mask.matrix", tensor, "mask")}

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._release()
        if exc_type is not None:
            return False                      # the user's error propagates; nothing is written
        if self.root.record["calls"] == 0:
            raise _capture_error(f"{type(self.module).__name__} was not called inside the capture, so there "
                                 "is nothing to record", hint="call the module inside the `with` block",
                                 code="ATT-E341")
        _RECORDERS[self.kind][1](self.root)      # a block's finisher finishes its attention parts
        for component in self.components:
            if component.record["calls"] > 1:
                self.note("ATT-W341", f"{component.name or type(self.module).__name__} was called "
                                      f"{component.record['calls']} times; the first call was recorded")
        self._check_versions()
        write_capture(self.path, self.store, self.document())
        return False

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._fastpath is not None:
            import torch
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def _check_versions(self) -> None:
        for key, tensor in self.store.tensors.items():
            if tensor._version != self.store.versions[key]:
                raise _capture_error(f"'{key}' was changed in place after it was recorded (e.g. by "
                                     "masked_fill_ or +=), so its recorded values are gone",
                                     hint="tap a copy: tap(name, tensor.clone()), or use the out-of-place "
                                          "operation", code="ATT-E342")

    # -- the document ---------------------------------------------------------
    def document(self) -> Dict[str, Any]:
        import torch
        devices = sorted({str(t.device) for t in self.store.tensors.values()})
        floats = [str(t.dtype).split(".")[-1] for t in self.store.tensors.values() if t.is_floating_point()]
        transformers_version = _installed_version("transformers")     # without importing it
        __version__ = _installed_version("attntrace")
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "producer": {"attntrace": __version__, "torch": torch.__version__, "transformers": transformers_version},
            "name": self.name or type(self.module).__name__,
            "device": devices[0] if len(devices) == 1 else devices,
            "dtype": max(set(floats), key=floats.count) if floats else None,
            "components": [c.record for c in self.components],
            "tensors": {key: {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1], "device": str(t.device),
                              "role": self.store.roles[key]} for key, t in self.store.tensors.items()},
            "notes": self.notes,
        }


# =========================================================================== the writer

def write_capture(path: Path, store: _Store, document: Dict[str, Any]) -> None:
    """Write the safetensors file: header first (offsets need only shapes), then each tensor's
    bytes in turn, moved to the host a chunk at a time; atomically (temporary file, then rename)."""
    entries = list(store.tensors.items())
    header: Dict[str, Any] = {}
    offset = 0
    for key, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": DTYPE_CODES[str(tensor.dtype).split(".")[-1]], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {METADATA_KEY: json.dumps(document, separators=(",", ":"))}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)                # the format pads the header to 8 bytes with spaces
    folder = path.resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                for _, tensor in entries:
                    _stream_tensor(out, tensor)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
    except OSError as error:
        raise input_error("ATT-E344", f"cannot write the capture file {path}: {error.strerror or error}",
                          hint="check the folder exists and is writable") from None


def _stream_tensor(out, tensor) -> None:
    import torch
    flat = tensor.reshape(-1)                    # a copy on the device only if not contiguous
    step = max(1, CHUNK_BYTES // max(1, tensor.element_size()))
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step].to("cpu")
        if part.dtype == torch.bfloat16:         # numpy has no bfloat16: write its bits
            part = part.view(torch.int16)
        elif part.dtype == torch.bool:
            part = part.to(torch.uint8)
        out.write(part.contiguous().numpy().data)


def _installed_version(distribution: str) -> Optional[str]:
    import importlib.metadata
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
