"""A captured module rebuilt as an attntrace spec: the same attention on the same inputs and weights.

:func:`rebuild` turns one part of a capture (:class:`CapturePart`) into a spec dict
that computes what the module computed: ``nn.MultiheadAttention`` in its layouts
(packed or separate projections, ``add_bias_kv``, ``batch_first``, bool or float
masks, ``is_causal``), Hugging Face BERT / GPT-2 / Llama attention modules, and
modules the user tapped (``attntrace.tap``) with the weights and mask they named.
What had to be assumed is kept as notes.  :mod:`attntrace.analysis.capture`
compares the trace of this spec with the captured hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from attntrace.errors import Diagnosis, InputError, input_error
from attntrace.inputs.capture_file import CaptureFile, references

TOLERANCES: Dict[str, Tuple[float, float]] = {      # dtype -> (rtol relative to the hook's magnitude, atol)
    "float64": (1e-9, 1e-12), "float32": (1e-5, 1e-8), "float16": (1e-2, 1e-5), "bfloat16": (4e-2, 1e-4)}
PRECISION_ORDER = ("bfloat16", "float16", "float32", "float64")     # least precise first
BLOCKED_AT = -1e4           # a captured score at or below this counts as blocked (-1e9, -10000, finfo.min)


def _not_comparable(what: str, hint: Optional[str] = None) -> InputError:
    return input_error("ATT-E351", f"not yet comparable: {what}", hint=hint)


def _missing(what: str, hint: Optional[str] = None) -> InputError:
    return input_error("ATT-E350", f"cannot rebuild the attention: {what}", hint=hint)


@dataclass
class Rebuild:
    """A capture part rebuilt as a spec, and what was assumed on the way."""

    spec: Dict[str, Any]
    description: str
    notes: List[Diagnosis] = field(default_factory=list)


class CapturePart:
    """One component of a capture, with its tensors read on demand (float64, bool kept)."""

    def __init__(self, capture: CaptureFile, record: Dict[str, Any]):
        self.capture, self.record = capture, record
        self.name, self.kind, self.config = record["name"], record["kind"], record["config"]
        self.notes: List[Diagnosis] = []

    @property
    def label(self) -> str:
        return self.name or self.record.get("class", "").rsplit(".", 1)[-1] or self.kind

    def tensor(self, key: Optional[str]) -> Optional[np.ndarray]:
        return None if key is None else self.capture.read64(key)

    def input(self, name: str) -> Optional[np.ndarray]:
        return self.tensor(self.record["inputs"].get(name))

    def weight(self, name: str) -> Optional[np.ndarray]:
        return self.tensor(self.record["weights"].get(name))

    def note(self, code: str, message: str, hint: Optional[str] = None) -> None:
        self.notes.append(Diagnosis(code=code, message=message, severity="warning", hint=hint))

    def dtype(self) -> str:
        """The least precise floating dtype among this part's tensors: it sets the tolerance."""
        keys = {key for _, key in references(self.record)}
        dtypes = {self.capture.tensors[k].dtype for k in keys if k in self.capture.tensors}
        floats = [d for d in PRECISION_ORDER if d in dtypes]
        return floats[0] if floats else "float64"


def _batched(x: np.ndarray) -> np.ndarray:
    return x[None] if x.ndim == 2 else x


def _tokens(n: int) -> List[str]:
    return [str(i) for i in range(n)]


def _scale(value: Any, d_head: int) -> Union[str, float]:
    """'auto' when the captured scale is 1/√d_head (so scale bugs can be replayed against it)."""
    if value in (None, "auto"):
        return "auto"
    if value == "none":
        return "none"
    value = float(value)
    return "auto" if abs(value - d_head ** -0.5) <= 1e-12 * value else value


# --------------------------------------------------------------------------- masks

def _additive_checked(array: np.ndarray, where: str) -> np.ndarray:
    soft = np.isfinite(array) & (array != 0) & (array > BLOCKED_AT)
    if soft.any():
        raise _not_comparable(f"{where} is a float mask with soft values such as {array[soft].flat[0]:g}: "
                              "attntrace masks block or keep (0 and -inf or ≤ -1e4)",
                              hint="soft biases (ALiBi, relative positions) are not part of a spec yet")
    if np.isnan(array).any() or np.isposinf(array).any():
        raise _not_comparable(f"{where} holds NaN or +inf")
    return np.where(array > BLOCKED_AT, 0.0, -np.inf)


def _zero_one_checked(array: np.ndarray, where: str, convention: str) -> np.ndarray:
    values = array.astype(np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise _not_comparable(f"{where} (convention {convention}) holds values other than 0 and 1",
                              hint="say mask='additive' if it is added to the scores")
    return values.astype(bool)


def _in_convention(array: np.ndarray, convention: str, where: str) -> np.ndarray:
    """A captured mask checked for its convention: bool arrays for keep/ignore, 0/-inf for additive."""
    if convention == "additive":
        return _additive_checked(np.asarray(array, dtype=np.float64), where)
    return _zero_one_checked(array, where, convention)


def _allowed_value(convention: str):
    return {"keep": True, "ignore": False, "additive": 0.0}[convention]


def _as_additive(array: np.ndarray, convention: str) -> np.ndarray:
    if convention == "additive":
        return array
    keep = array if convention == "keep" else ~array
    return np.where(keep, 0.0, -np.inf)


def _mask_block(pieces: Dict[str, Tuple[np.ndarray, str]], causal: bool = False) -> Any:
    """A spec mask mapping from {padding|matrix: (array, convention)}: one convention for both
    (additive when they were given in different ones)."""
    if not pieces:
        return "causal" if causal else "none"
    conventions = {conv for _, conv in pieces.values()}
    convention = conventions.pop() if len(conventions) == 1 else "additive"
    block: Dict[str, Any] = {"convention": convention}
    for name, (array, conv) in pieces.items():
        block[name] = array if conv == convention else _as_additive(array, conv)
    if causal:
        block["causal"] = True
    return block


def _user_mask(array: np.ndarray, convention: str, batch: int, seq_q: int, seq_k: int, where: str,
               part: CapturePart) -> Dict[str, Tuple[np.ndarray, str]]:
    """A mask as the user's code holds it -> {padding|matrix: (array, convention)}.

    Read batch-first, the way tutorials broadcast it against scores (batch, heads, seq_q, seq_k):
    (batch, 1 | heads, seq_q | 1, seq_k), (batch, seq_q | 1, seq_k), (seq_q, seq_k), (batch, seq_k) or (seq_k,)."""
    shape = array.shape
    if array.ndim == 4:
        if shape[1] != 1:
            raise _not_comparable(f"{where} has shape {shape}: a different mask per head",
                                  hint="attntrace masks are shared by the heads")
        array = array[:, 0]
    if array.ndim == 3 and array.shape[1] == 1:
        array = array[:, 0]
        return _fit_padding(array, convention, batch, seq_k, where, shape)
    if array.ndim == 3:
        if array.shape[0] not in (1, batch) or array.shape[1:] != (seq_q, seq_k):
            raise _mask_shape_error(where, shape, batch, seq_q, seq_k)
        matrix = array[0] if array.shape[0] == 1 else array
        return {"matrix": (_in_convention(matrix, convention, where), convention)}
    if array.ndim == 2:
        as_matrix, as_padding = shape == (seq_q, seq_k), shape == (batch, seq_k)
        if as_matrix and as_padding and batch != 1:
            part.note("ATT-W343", f"{where} of shape {shape} was read as a (seq_q, seq_k) matrix, not as "
                                  "(batch, seq_k) padding", "give it as (batch, 1, seq_k) to mean padding")
        if as_matrix:
            return {"matrix": (_in_convention(array, convention, where), convention)}
        return _fit_padding(array, convention, batch, seq_k, where, shape)
    if array.ndim == 1:
        return _fit_padding(array, convention, batch, seq_k, where, shape)
    raise _mask_shape_error(where, shape, batch, seq_q, seq_k)


def _fit_padding(array, convention, batch, seq_k, where, shape) -> Dict[str, Tuple[np.ndarray, str]]:
    if array.shape[-1] != seq_k or (array.ndim == 2 and array.shape[0] not in (1, batch)):
        raise _mask_shape_error(where, shape, batch, None, seq_k)
    padding = array[0] if array.ndim == 2 and array.shape[0] == 1 else array
    return {"padding": (_in_convention(padding, convention, where), convention)}


def _mask_shape_error(where: str, shape, batch: int, seq_q: Optional[int], seq_k: int) -> InputError:
    wanted = f"(batch={batch}, seq_q={seq_q}, seq_k={seq_k})" if seq_q else f"(batch={batch}, seq_k={seq_k})"
    return _not_comparable(f"{where} has shape {tuple(shape)}, which does not broadcast to {wanted}")


def _causal_top_left(seq_q: int, seq_k: int) -> np.ndarray:
    """PyTorch's is_causal: query i sees keys j ≤ i (aligned top-left)."""
    return np.arange(seq_k)[None, :] <= np.arange(seq_q)[:, None]


# --------------------------------------------------------------------------- side-by-side inputs

def _side_by_side(query: np.ndarray, key: np.ndarray, value: np.ndarray, weights: Dict[str, np.ndarray],
                  biases: Dict[str, Optional[np.ndarray]], layout: str, extra_rows: Sequence[Tuple[str, Any, Any]]):
    """Cross-attention whose keys and values read different inputs (or get extra key rows): the
    spec's encoder feeds both W_k and W_v, so the inputs are laid side by side — X = [query | 0],
    X_enc = [key | value | indicators] — and each weight reads only its own columns (zeros
    elsewhere).  An extra row (add_bias_kv, add_zero_attn) is an indicator column whose weight
    row makes k and v exactly the given vectors.  Exact: the added terms are zeros."""
    blocks: List[np.ndarray] = [query]           # distinct inputs, by identity of their values
    def block_of(array):
        for i, b in enumerate(blocks):
            if b.shape == array.shape and np.array_equal(b, array):
                return i
        blocks.append(array)
        return len(blocks) - 1
    k_block, v_block = block_of(key), block_of(value)
    widths = [b.shape[-1] for b in blocks]
    starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    total = int(starts[-1]) + len(extra_rows)
    batch, seq_q, seq_k = query.shape[0], query.shape[1], key.shape[1]
    x = np.zeros((batch, seq_q, total))
    x[..., :widths[0]] = query
    x_enc = np.zeros((batch, seq_k + len(extra_rows), total))
    for i in sorted({k_block, v_block}):
        x_enc[:, :seq_k, starts[i]:starts[i + 1]] = blocks[i]
    for r in range(len(extra_rows)):
        x_enc[:, seq_k + r, starts[-1] + r] = 1.0

    def widened(name: str, block: int, extras: Sequence[Any]) -> np.ndarray:
        w = weights[name] if layout == "linear" else weights[name].T       # as (out, in) here
        out = np.zeros((w.shape[0], total))
        out[:, starts[block]:starts[block + 1]] = w
        bias = biases.get(name.replace("W_", "b_"))
        for r, vector in enumerate(extras):     # indicator r: k (or v) = vector exactly, bias included
            out[:, starts[-1] + r] = vector - (bias if bias is not None else 0.0)
        return out if layout == "linear" else out.T
    return (x, x_enc, widened("W_q", 0, []), widened("W_k", k_block, [k for _, k, _ in extra_rows]),
            widened("W_v", v_block, [v for _, _, v in extra_rows]))


def _attention_inputs(spec: Dict[str, Any], query, key, value, weights, biases, layout,
                      extra_rows: Sequence[Tuple[str, Any, Any]] = ()) -> None:
    """Fill the spec's embeddings, encoder and W_q/W_k/W_v: self-attention when key and value
    are the query, plain cross-attention when key is value, side by side otherwise."""
    if not extra_rows and np.array_equal(key, value) and key.shape == query.shape and np.array_equal(key, query):
        spec.update(tokens=_tokens(query.shape[1]), embeddings=query)
        spec["attention"].update({k: weights[k] for k in ("W_q", "W_k", "W_v")})
        return
    if not extra_rows and key.shape == value.shape and np.array_equal(key, value) \
            and key.shape[-1] == query.shape[-1]:
        spec.update(tokens=_tokens(query.shape[1]), embeddings=query,
                    encoder={"tokens": _tokens(key.shape[1]), "embeddings": key})
        spec["attention"].update({k: weights[k] for k in ("W_q", "W_k", "W_v")})
        return
    x, x_enc, w_q, w_k, w_v = _side_by_side(query, key, value, weights, biases, layout, extra_rows)
    spec.update(tokens=_tokens(query.shape[1]), embeddings=x,
                encoder={"tokens": _tokens(key.shape[1]) + [name for name, _, _ in extra_rows], "embeddings": x_enc})
    spec["attention"].update(W_q=w_q, W_k=w_k, W_v=w_v)


def _base_spec(name: str, heads: int, kv_heads: int, layout: str, scale, biases: Dict[str, Optional[np.ndarray]],
               w_o: Optional[np.ndarray] = None) -> Dict[str, Any]:
    attention: Dict[str, Any] = {"heads": heads, "layout": layout, "scale": scale}
    if kv_heads != heads:
        attention["kv_heads"] = kv_heads
    if w_o is not None:
        attention["W_o"] = w_o
    attention.update({k: v for k, v in biases.items() if v is not None})
    return {"version": 1, "name": name, "attention": attention}


# --------------------------------------------------------------------------- nn.MultiheadAttention

def _mha_spec(part: CapturePart) -> Rebuild:
    c = part.config
    query, key, value = (part.input(n) for n in ("query", "key", "value"))
    if query is None or key is None or value is None:
        raise _missing(f"{part.label}: the query, key or value input was not recorded")
    if c["batched"] and not c["batch_first"]:              # (seq, batch, d) -> (batch, seq, d)
        query, key, value = (a.transpose(1, 0, 2) for a in (query, key, value))
    query, key, value = (_batched(a) for a in (query, key, value))
    batch, seq_q, seq_k, heads, e = query.shape[0], query.shape[1], key.shape[1], c["heads"], c["embed_dim"]
    if c["packed_in_proj"]:
        w_q, w_k, w_v = np.split(part.weight("in_proj_weight"), 3)
    else:
        w_q, w_k, w_v = (part.weight(f"{n}_proj_weight") for n in "qkv")
    in_bias = part.weight("in_proj_bias")
    b_q, b_k, b_v = np.split(in_bias, 3) if in_bias is not None else (None, None, None)
    biases = {"b_q": b_q, "b_k": b_k, "b_v": b_v, "b_o": part.weight("out_proj.bias")}
    extra: List[Tuple[str, Any, Any]] = []
    if c["add_bias_kv"]:
        extra.append(("bias_kv", part.weight("bias_k").reshape(e), part.weight("bias_v").reshape(e)))
    if c["add_zero_attn"]:
        extra.append(("zero_attn", np.zeros(e), np.zeros(e)))
    spec = _base_spec(part.label, heads, heads, "linear", "auto", biases, part.weight("out_proj.weight"))
    _attention_inputs(spec, query, key, value, {"W_q": w_q, "W_k": w_k, "W_v": w_v}, biases, "linear", extra)
    spec["attention"]["mask"] = _mha_mask(part, batch, seq_q, seq_k, len(extra))
    description = (f"nn.MultiheadAttention: {heads} heads, d_head {c['d_head']}, "
                   f"{'packed in_proj' if c['packed_in_proj'] else 'separate q/k/v_proj'}"
                   f"{'' if c['bias'] else ', no bias'}{', add_bias_kv' if c['add_bias_kv'] else ''}"
                   f"{', add_zero_attn' if c['add_zero_attn'] else ''}, batch_first={c['batch_first']}")
    return Rebuild(spec, description, part.notes)


def _mha_mask(part: CapturePart, batch: int, seq_q: int, seq_k: int, extra: int) -> Any:
    """nn.MultiheadAttention's masks in the convention they were given (bool: True = blocked)."""
    c = part.config
    kpm, attn_mask = part.input("key_padding_mask"), part.input("attn_mask")
    total = seq_k + extra
    if c["is_causal"] and kpm is None and not c["need_weights"]:
        # PyTorch then drops attn_mask and runs SDPA with is_causal=True (aligned top-left)
        if attn_mask is not None and not np.array_equal(_in_convention(
                attn_mask, c["masks"]["attn_mask"]["convention"], "attn_mask") == _allowed_value(
                c["masks"]["attn_mask"]["convention"]), _causal_top_left(seq_q, seq_k)):
            part.note("ATT-W345", "is_causal=True but attn_mask is not the causal mask: PyTorch used the causal "
                                  "mask (the hint wins when need_weights=False and there is no key_padding_mask)")
        if total == seq_q:
            return "causal"
        return {"matrix": _causal_top_left(seq_q, total), "convention": "keep"}
    pieces: Dict[str, Tuple[np.ndarray, str]] = {}
    if kpm is not None:
        convention = c["masks"]["key_padding_mask"]["convention"]
        padded = _in_convention(kpm if kpm.ndim == 2 else kpm[None], convention, "key_padding_mask")
        padded = np.pad(padded, ((0, 0), (0, extra)), constant_values=_allowed_value(convention))
        pieces["padding"] = (padded, convention)
    if attn_mask is not None:
        convention = c["masks"]["attn_mask"]["convention"]
        matrix = _in_convention(attn_mask, convention, "attn_mask")
        if matrix.ndim == 3:                    # (batch·heads, seq_q, seq_k): one mask per head
            per_head = matrix.reshape(batch, c["heads"], seq_q, seq_k)
            if not (per_head == per_head[:, :1]).all():
                raise _not_comparable("attn_mask differs between the heads of a batch item",
                                      hint="attntrace masks are shared by the heads")
            matrix = per_head[:, 0]
        pad = ((0, 0),) * (matrix.ndim - 1) + ((0, extra),)
        pieces["matrix"] = (np.pad(matrix, pad, constant_values=_allowed_value(convention)), convention)
    return _mask_block(pieces)


# --------------------------------------------------------------------------- tapped modules

def _split_fused(w: np.ndarray, b: Optional[np.ndarray], layout: str, heads: int, kv_heads: int):
    """A fused [q | k | v] projection split by heads (q: heads·d, k and v: kv_heads·d each)."""
    axis = 0 if layout == "linear" else 1
    width = w.shape[axis]
    if width % (heads + 2 * kv_heads):
        raise _missing(f"W_qkv has width {width}, which is not (heads + 2·kv_heads)·d_head for heads={heads}, "
                       f"kv_heads={kv_heads}", hint="give W_q, W_k, W_v separately")
    d = width // (heads + 2 * kv_heads)
    cuts = [heads * d, (heads + kv_heads) * d]
    ws = np.split(w, cuts, axis=axis)
    bs = np.split(b, cuts) if b is not None else (None, None, None)
    return ws, bs


def _tapped_spec(part: CapturePart, hooks: Dict[str, Dict[str, Any]]) -> Rebuild:
    c = part.config
    heads = c.get("heads")
    weights = {k: part.tensor(v) for k, v in c.get("weights", {}).items()}
    if not heads or not (("W_q" in weights and "W_k" in weights and "W_v" in weights) or "W_qkv" in weights):
        raise _missing(f"{part.label} is not a module attntrace knows, and the capture was not told what it is",
                       hint="capture(module, path, weights={'q': m.q_proj, 'k': ..., 'v': ..., 'o': ...}, heads=N)")
    kv_heads = c.get("kv_heads") or heads
    layout = c.get("layout") or "linear"
    if "W_qkv" in weights:
        (w_q, w_k, w_v), (b_q, b_k, b_v) = _split_fused(weights["W_qkv"], weights.get("b_qkv"), layout, heads,
                                                        kv_heads)
        weights.update(W_q=w_q, W_k=w_k, W_v=w_v, b_q=b_q, b_k=b_k, b_v=b_v)
    roles = c.get("roles", {})
    query = _tapped_input(part, hooks, "hook_embed", roles.get("query"))
    if query is None:
        raise _missing(f"{part.label}: no input was recorded (no tensor argument, no tap('hook_embed', x))")
    key = _tapped_input(part, hooks, "hook_encoder_embed", roles.get("key")) if roles.get("key") else None
    value = part.input(roles["value"]) if roles.get("value") else None
    key = query if key is None else key
    value = key if value is None else value
    query, key, value = (_batched(a) for a in (query, key, value))
    biases = {k: weights.get(k) for k in ("b_q", "b_k", "b_v", "b_o")}
    w_q = weights["W_q"]
    d_head = (w_q.shape[0] if layout == "linear" else w_q.shape[1]) // heads
    spec = _base_spec(part.label, heads, kv_heads, layout, _scale(c.get("scale"), d_head), biases,
                      weights.get("W_o"))
    _attention_inputs(spec, query, key, value, weights, biases, layout)
    spec["attention"]["mask"] = _tapped_mask(part, query.shape[0], query.shape[1], key.shape[1])
    description = (f"{part.record.get('class', 'module').rsplit('.', 1)[-1]} (tapped): {heads} heads"
                   f"{f', {kv_heads} kv heads' if kv_heads != heads else ''}, layout {layout}")
    return Rebuild(spec, description, part.notes)


def _tapped_input(part: CapturePart, hooks: Dict[str, Dict[str, Any]], hook: str, argument: Optional[str]):
    entry = hooks.get(hook)
    if entry is not None:
        return part.tensor(entry["tensor"])
    return part.input(argument) if argument else None


def _tapped_mask(part: CapturePart, batch: int, seq_q: int, seq_k: int) -> Any:
    mask = part.config.get("mask") or {"kind": "none"}
    kind = mask.get("kind", "none")
    if kind in ("none", "causal"):
        return kind
    convention = mask.get("convention", "keep")
    pieces: Dict[str, Tuple[np.ndarray, str]] = {}
    if kind == "argument":
        pieces = _user_mask(part.tensor(mask["tensor"]), convention, batch, seq_q, seq_k,
                            f"the mask argument '{mask.get('argument')}'", part)
    else:                                        # given to capture(mask=...)
        for name in ("matrix", "padding"):
            if mask.get(name):
                pieces.update(_user_mask(part.tensor(mask[name]), convention, batch, seq_q, seq_k,
                                         f"mask {name}", part))
    return _mask_block(pieces, causal=bool(mask.get("causal")))


# --------------------------------------------------------------------------- Hugging Face

def _hf_mask(part: CapturePart, batch: int, seq_q: int, seq_k: int) -> Any:
    """The attention_mask as the module got it: float = added (eager), bool = True may attend
    (sdpa), integer = the tokenizer's 1 = real token; None = causal only where the sdpa/flash
    path applies is_causal (eager adds nothing)."""
    c = part.config
    info = c.get("attention_mask")
    key = "encoder_attention_mask" if c.get("cross") and "encoder_attention_mask" in part.record["inputs"] \
        else "attention_mask"
    mask = part.input(key)
    if mask is None:
        causal = c.get("is_causal") and c.get("attn_implementation") != "eager" and seq_q > 1 and not c.get("cross")
        if causal and seq_q != seq_k:
            return {"matrix": _causal_top_left(seq_q, seq_k), "convention": "keep"}
        return "causal" if causal else "none"
    convention = (info or {}).get("convention", "additive")
    return _mask_block(_user_mask(mask, convention, batch, seq_q, seq_k, key, part))


def _hf_refuse_cache(part: CapturePart) -> None:
    if part.config.get("cache"):
        raise _not_comparable(f"{part.label} ran with a KV cache: its keys include earlier tokens the capture "
                              "does not hold", hint="capture a forward pass without cache (use_cache=False)")


def _hf_inputs(part: CapturePart):
    hidden = part.input("hidden_states")
    if hidden is None:
        raise _missing(f"{part.label}: hidden_states was not recorded")
    encoder = part.input("encoder_hidden_states")
    query = _batched(hidden)
    key = _batched(encoder) if encoder is not None else query
    return query, key


def _hf_spec(part: CapturePart, weights: Dict[str, np.ndarray], biases: Dict[str, Optional[np.ndarray]],
             w_o: Optional[np.ndarray], layout: str, description: str) -> Rebuild:
    _hf_refuse_cache(part)
    c = part.config
    query, key = _hf_inputs(part)
    spec = _base_spec(part.label, c["heads"], c["kv_heads"], layout, _scale(c.get("scale"), c["d_head"]), biases, w_o)
    _attention_inputs(spec, query, key, key, weights, biases, layout)
    spec["attention"]["mask"] = _hf_mask(part, query.shape[0], query.shape[1], key.shape[1])
    return Rebuild(spec, description, part.notes)


def _bert_spec(part: CapturePart) -> Rebuild:
    prefix = part.config.get("weight_prefix", "")
    weights = {f"W_{n}": part.weight(f"{prefix}{name}.weight") for n, name in zip("qkv", ("query", "key", "value"))}
    biases = {f"b_{n}": part.weight(f"{prefix}{name}.bias") for n, name in zip("qkv", ("query", "key", "value"))}
    w_o = None
    if part.config.get("has_w_o"):
        w_o, biases["b_o"] = part.weight("output.dense.weight"), part.weight("output.dense.bias")
    what = "BertAttention (self-attention and output.dense; its residual + LayerNorm is a block step)" \
        if w_o is not None else "BertSelfAttention"
    return _hf_spec(part, weights, biases, w_o, "linear",
                    f"{what}: {part.config['heads']} heads, d_head {part.config['d_head']}")


def _gpt2_spec(part: CapturePart) -> Rebuild:
    c = part.config
    w, b = part.weight("c_attn.weight"), part.weight("c_attn.bias")      # Conv1D: x @ W + b, W (in, out)
    if c.get("cross"):
        (w_k, w_v), (b_k, b_v) = np.split(w, 2, axis=1), np.split(b, 2)
        w_q, b_q = part.weight("q_attn.weight"), part.weight("q_attn.bias")
    else:
        (w_q, w_k, w_v), (b_q, b_k, b_v) = np.split(w, 3, axis=1), np.split(b, 3)
    biases = {"b_q": b_q, "b_k": b_k, "b_v": b_v, "b_o": part.weight("c_proj.bias")}
    return _hf_spec(part, {"W_q": w_q, "W_k": w_k, "W_v": w_v}, biases, part.weight("c_proj.weight"), "x_at_w",
                    f"GPT2Attention: {c['heads']} heads, d_head {c['d_head']}, Conv1D (x_at_w) weights")


def _llama_spec(part: CapturePart) -> Rebuild:
    c = part.config
    weights = {f"W_{n}": part.weight(f"{n}_proj.weight") for n in "qkv"}
    biases = {f"b_{n}": part.weight(f"{n}_proj.bias") for n in "qkvo"}
    rebuild = _hf_spec(part, weights, biases, part.weight("o_proj.weight"), "linear",
                       f"{part.record.get('class', '').rsplit('.', 1)[-1]}: {c['heads']} heads, {c['kv_heads']} kv "
                       f"heads, d_head {c['d_head']}, RoPE")
    rebuild.spec["positional"] = _llama_rope(part, rebuild.spec["embeddings"].shape[1])
    return rebuild


def _llama_rope(part: CapturePart, seq: int) -> Dict[str, Any]:
    """RoPE is passed in as (cos, sin); attntrace rebuilds it only when they are the standard
    table at positions 0..seq-1 (default frequencies, no scaling)."""
    c = part.config
    cos, sin = part.input("position_embeddings.0"), part.input("position_embeddings.1")
    if cos is None or sin is None:
        raise _missing(f"{part.label}: position_embeddings (cos, sin) were not recorded")
    base = float((c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    d = c["d_head"]
    angles = np.arange(seq)[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)             # rotate_half: pair i with i + d/2
    rtol, _ = TOLERANCES[part.dtype()]
    for name, got, want in (("cos", cos, np.cos(angles)), ("sin", sin, np.sin(angles))):
        if got.shape[-2:] != want.shape or np.abs(got - want).max() > 10 * rtol:
            raise _not_comparable(f"{part.label}'s RoPE {name} table is not the default one at positions "
                                  f"0..{seq - 1} (rope type {(c.get('rope_parameters') or {}).get('rope_type')})",
                                  hint="scaled RoPE, offsets and per-item positions are not part of a spec yet")
    return {"kind": "rope", "base": base, "pairing": "half"}


_BUILDERS: Dict[str, Callable[[CapturePart], Rebuild]] = {
    "mha": _mha_spec, "hf-bert-self": _bert_spec, "hf-bert-attention": _bert_spec, "hf-gpt2": _gpt2_spec,
    "hf-llama": _llama_spec}
BLOCK_KINDS = ("encoder-layer", "decoder-layer")


def rebuild(part: CapturePart, hooks: Dict[str, Dict[str, Any]]) -> Rebuild:
    if part.kind == "tapped":
        return _tapped_spec(part, hooks)
    if part.kind in BLOCK_KINDS:
        parts = ", ".join(part.record.get("parts", []))
        raise _not_comparable(f"{part.label} is a whole {part.kind} (norms, MLP, residuals); attntrace specs hold "
                              f"one attention until `blocks:` lands", hint=f"its attention parts are: {parts}")
    if part.kind not in _BUILDERS:
        raise _not_comparable(f"a part of kind '{part.kind}' (written by a newer attntrace?)")
    return _BUILDERS[part.kind](part)


