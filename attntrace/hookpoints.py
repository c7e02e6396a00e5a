"""The hook-point vocabulary: the one table of every named place in a trace.

Each :class:`HookPoint` carries its name (TransformerLens' spelling), whether
it exists once per trace or once per transformer block, its named axes, which
axes a renderer lays out as rows, columns and panels, the symbol formulas use
for it, its formula, and the aliases people write in articles and homework.
The plan, the renderers, the backward pass, the dataflow view and the
diagnosis all read these facts from here; nothing else restates them.

Names: a trace of one attention layer uses short names (``attn.hook_q``,
``hook_attn_out``) and also accepts ``blocks.0.``; a trace of transformer
blocks names every block's hooks ``blocks.L.attn.hook_q`` ...  Parameters
(``W_q`` ...) have their own small table with their axes for the ``x_at_w``
layout (``linear`` layouts store the transpose).

This module imports nothing from attntrace but errors and text, so the spec
reader (which resolves hook names in ``expect:`` and ``hooks:``) can use it.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from attntrace.errors import Location, input_error
from attntrace.text import did_you_mean

MODEL, BLOCK = "model", "block"      # once per trace; once per transformer block


@dataclass(frozen=True)
class HookPoint:
    name: str                         # local name: "attn.hook_q"; a block's hooks get "blocks.L." in front
    scope: str                        # MODEL | BLOCK
    axes: Tuple[str, ...]             # named axes of the array
    rows: int                         # axis shown as matrix rows
    cols: int                         # axis shown as matrix columns
    panels: Optional[int]             # axis with one panel per head (None: no head axis)
    symbol: str                       # the operand's name in formulas and diagnoses: "Q", "weights"
    formula: str                      # the generic formula; the plan's step titles specialise it
    what: str                         # one line for `attntrace hooks`
    aliases: Tuple[str, ...] = ()     # other names accepted for it

    @property
    def display(self) -> Tuple[int, int, Optional[int]]:
        return self.rows, self.cols, self.panels


def _point(name, scope, axes, display, symbol, formula, what, aliases=()) -> HookPoint:
    rows, cols, panels = display
    return HookPoint(name, scope, tuple(axes), rows, cols, panels, symbol, formula, what, tuple(aliases))


_RESIDUAL = ("batch", "seq_q", "d_model")
_PER_HEAD = ((1, 3, 2))               # (batch, seq, heads, d): rows seq, columns d, a panel per head
_SCORES = ("batch", "n_heads", "seq_q", "seq_k")
_SCORE_DISPLAY = (2, 3, 1)
_MATRIX = (1, 2, None)

# In execution order.  Optional points exist only when a spec needs them (positions,
# RoPE, masks, cross-attention, norms, an MLP).
HOOK_POINTS: Tuple[HookPoint, ...] = (
    _point("hook_embed", MODEL, _RESIDUAL, _MATRIX, "X", "X = embeddings", "X, the token embeddings",
           ("X", "embed")),
    _point("hook_pos_embed", MODEL, _RESIDUAL, _MATRIX, "X", "X = X + PE",
           "X plus the positional encoding (and token-type embeddings)"),
    _point("embed.ln.hook_normalized", MODEL, _RESIDUAL, _MATRIX, "X", "X = LayerNorm(X)",
           "the embeddings after the embedding norm (BERT)", ("embed_ln",)),
    _point("hook_encoder_embed", MODEL, ("batch", "seq_k", "d_model"), _MATRIX, "X_enc", "X_enc = encoder embeddings",
           "the encoder's embeddings (cross-attention: keys and values come from here)"),
    _point("hook_resid_pre", BLOCK, _RESIDUAL, _MATRIX, "resid", "resid_pre = block input",
           "the residual stream entering the block", ("resid_pre",)),
    _point("ln1.hook_normalized", BLOCK, _RESIDUAL, _MATRIX, "X", "X = norm1(resid_pre)",
           "the first norm: the attention's input (pre-norm), or norm1(resid_mid) (post-norm)", ("ln1",)),
    _point("attn.hook_q", BLOCK, ("batch", "seq_q", "n_heads", "d_head"), _PER_HEAD, "Q", "Q = X·W_q, split heads",
           "queries, split into heads", ("Q", "q")),
    _point("attn.hook_k", BLOCK, ("batch", "seq_k", "n_kv_heads", "d_head"), _PER_HEAD, "K",
           "K = X·W_k, split heads", "keys, split into heads", ("K", "k")),
    _point("attn.hook_v", BLOCK, ("batch", "seq_k", "n_kv_heads", "d_v"), _PER_HEAD, "V", "V = X·W_v, split heads",
           "values, split into heads", ("V", "v")),
    _point("attn.hook_rot_q", BLOCK, ("batch", "seq_q", "n_heads", "d_head"), _PER_HEAD, "Q", "Q = RoPE(Q)",
           "queries after RoPE", ("rot_q",)),
    _point("attn.hook_rot_k", BLOCK, ("batch", "seq_k", "n_kv_heads", "d_head"), _PER_HEAD, "K", "K = RoPE(K)",
           "keys after RoPE", ("rot_k",)),
    # `scores` is an old alias of this point (raw Q·Kᵀ), kept because the README used it;
    # `qk` is the unambiguous name, since attn.hook_attn_scores holds the masked scores.
    _point("attn.hook_qk", BLOCK, _SCORES, _SCORE_DISPLAY, "scores", "scores = Q·Kᵀ", "raw scores Q·Kᵀ",
           ("qk", "QK", "scores")),
    _point("attn.hook_scaled", BLOCK, _SCORES, _SCORE_DISPLAY, "scaled", "scaled = scores · scale",
           "scores times the scale (plus ALiBi)", ("scaled",)),
    _point("attn.hook_mask", BLOCK, ("batch", "1", "seq_q", "seq_k"), _SCORE_DISPLAY, "mask",
           "mask (True = may attend)", "the mask, True = may attend", ("mask",)),
    _point("attn.hook_attn_scores", BLOCK, _SCORES, _SCORE_DISPLAY, "masked", "masked = where(mask, scaled, −∞)",
           "scores after masking (blocked = -inf)", ("masked", "attn_scores")),
    _point("attn.hook_pattern", BLOCK, _SCORES, _SCORE_DISPLAY, "weights", "weights = softmax(masked) over seq_k",
           "softmax weights", ("weights", "pattern", "attn")),
    # chunked attention (online softmax over key blocks): the running state of the traced query row
    _point("attn.hook_block_max", BLOCK, ("batch", "n_heads", "row", "k_block"), (2, 3, 1), "m",
           "m = max(m, max of the block's scores)", "chunked: the running max after each key block", ("block_max",)),
    _point("attn.hook_block_sum", BLOCK, ("batch", "n_heads", "row", "k_block"), (2, 3, 1), "l",
           "l = l·e^(m_old−m) + Σ e^(s−m)", "chunked: the running sum after each key block", ("block_sum",)),
    _point("attn.hook_block_out", BLOCK, ("batch", "n_heads", "row", "k_block", "d_v"), (3, 4, 1), "acc",
           "acc = acc·e^(m_old−m) + Σ e^(s−m)·v", "chunked: the running (unnormalised) output after each key block",
           ("block_out",)),
    _point("attn.hook_z", BLOCK, ("batch", "seq_q", "n_heads", "d_v"), _PER_HEAD, "z", "z = weights·V",
           "weights·V per head", ("z",)),
    _point("attn.hook_z_concat", BLOCK, ("batch", "seq_q", "n_heads·d_v"), _MATRIX, "concat", "concat heads",
           "heads concatenated", ("concat",)),
    _point("hook_attn_out", BLOCK, ("batch", "seq_q", "d_out"), _MATRIX, "out", "out = concat·W_o",
           "output after W_o", ("output", "out", "attn_out")),
    _point("hook_resid_mid", BLOCK, _RESIDUAL, _MATRIX, "resid", "resid_mid = resid_pre + attn_out",
           "the residual stream after attention", ("resid_mid",)),
    _point("ln2.hook_normalized", BLOCK, _RESIDUAL, _MATRIX, "X", "X = norm2(resid_mid)",
           "the second norm: the MLP's input (pre-norm), or the block's output (post-norm)", ("ln2",)),
    _point("mlp.hook_pre", BLOCK, ("batch", "seq_q", "d_mlp"), _MATRIX, "pre", "pre = X·W_in + b_in",
           "the MLP's hidden layer before the activation (gated: the gate)", ("mlp_pre",)),
    _point("mlp.hook_post", BLOCK, ("batch", "seq_q", "d_mlp"), _MATRIX, "post", "post = act(pre)",
           "the MLP's hidden layer after the activation (gated: act(gate) ⊙ up)", ("mlp_post",)),
    _point("hook_mlp_out", BLOCK, _RESIDUAL, _MATRIX, "mlp_out", "mlp_out = post·W_out + b_out", "the MLP's output",
           ("mlp_out",)),
    _point("hook_resid_post", BLOCK, _RESIDUAL, _MATRIX, "resid", "resid_post = resid_mid + mlp_out",
           "resid_mid (post-norm: ln1) + mlp_out; a post-norm block's output is ln2 of it", ("resid_post",)),
    _point("ln_final.hook_normalized", MODEL, _RESIDUAL, _MATRIX, "X", "X = norm_final(resid)",
           "the residual stream after the final norm", ("ln_final",)),
)
HOOKS_BY_NAME: Dict[str, HookPoint] = {h.name: h for h in HOOK_POINTS}
ALIASES: Dict[str, str] = {alias: h.name for h in HOOK_POINTS for alias in h.aliases}
# The operand names formulas use (X, Q, scores, weights ...) -> the hook holding that operand
# (the first point with that symbol: Q is attn.hook_q, RoPE's rotated Q is also written Q).
SYMBOLS: Dict[str, str] = {}
for _point_ in HOOK_POINTS:
    SYMBOLS.setdefault(_point_.symbol, _point_.name)
del _point_


@dataclass(frozen=True)
class Parameter:
    name: str
    axes: Tuple[str, ...]             # for layout x_at_w: (in, out); `linear` stores the transpose
    step: str                         # the plan step that reads it
    what: str


PARAMETERS: Tuple[Parameter, ...] = (
    Parameter("W_q", ("d_model", "n_heads·d_head"), "q", "query projection"),
    Parameter("W_k", ("d_model", "n_kv_heads·d_head"), "k", "key projection"),
    Parameter("W_v", ("d_model", "n_kv_heads·d_v"), "v", "value projection"),
    Parameter("W_o", ("n_heads·d_v", "d_out"), "out", "output projection"),
    Parameter("b_q", ("n_heads·d_head",), "q", "query bias"),
    Parameter("b_k", ("n_kv_heads·d_head",), "k", "key bias"),
    Parameter("b_v", ("n_kv_heads·d_v",), "v", "value bias"),
    Parameter("b_o", ("d_out",), "out", "output bias"),
)
PARAMETERS_BY_NAME: Dict[str, Parameter] = {p.name: p for p in PARAMETERS}
# The projections that split into heads: weight -> (bias, step, heads axis, width axis, sequence axis)
PROJECTIONS: Dict[str, Tuple[str, str, str, str, str]] = {
    "W_q": ("b_q", "q", "n_heads", "d_head", "seq_q"),
    "W_k": ("b_k", "k", "n_kv_heads", "d_head", "seq_k"),
    "W_v": ("b_v", "v", "n_kv_heads", "d_v", "seq_k"),
}


def parameter_axes(name: str, layout: str = "x_at_w") -> Tuple[str, ...]:
    axes = PARAMETERS_BY_NAME[name].axes
    return axes[::-1] if layout == "linear" and len(axes) == 2 else axes


# --------------------------------------------------------------------------- names

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_name(name: str) -> Tuple[Optional[int], str]:
    """"blocks.3.attn.hook_q" -> (3, "attn.hook_q"); "hook_embed" -> (None, "hook_embed")."""
    match = _BLOCK_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def full_name(local: str, layer: Optional[int]) -> str:
    """The name of a hook in a trace: short for a single attention layer (layer None)."""
    return local if layer is None or HOOKS_BY_NAME[local].scope == MODEL else f"blocks.{layer}.{local}"


def point_of(name: str) -> Optional[HookPoint]:
    """The hook point of a full name ("blocks.2.attn.hook_q", "attn.hook_q", an alias), or None."""
    _, local = split_name(name)
    local = ALIASES.get(local, local)
    return HOOKS_BY_NAME.get(local)


def _layers_of(available: Sequence[str], local: str) -> List[str]:
    return [n for n in available if split_name(n)[1] == local]


def resolve_hook_name(name: str, location: Optional[Location] = None,
                      available: Optional[Sequence[str]] = None) -> str:
    """A name, an alias or a `blocks.L.` name -> the hook name in `available`; else a did-you-mean error.

    Without `available`, any hook point of the vocabulary is accepted (a spec's
    `expect:` is read before the plan exists)."""
    names = list(available) if available is not None else [h.name for h in HOOK_POINTS]
    if name in names:
        return name
    layer, local = split_name(name)
    local = ALIASES.get(local, local)
    if available is None and layer is not None and local in HOOKS_BY_NAME:
        return full_name(local, layer)          # any block's hook is a name of the vocabulary
    candidate = full_name(local, layer) if local in HOOKS_BY_NAME else name
    if candidate in names:
        return candidate
    if local in names and layer == 0:                 # a one-layer trace accepts `blocks.0.`
        return local
    everywhere = _layers_of(names, local)
    if layer is None and len(everywhere) == 1:        # a one-block model accepts the short name
        return everywhere[0]
    if layer is None and len(everywhere) > 1:
        layers = [split_name(n)[0] for n in everywhere]
        raise input_error("ATT-E015", f"'{name}' is in every block of this model; say which one",
                          location, hint=f"write blocks.L.{local} with L from {min(layers)} to {max(layers)}, "
                                         f"or the pattern blocks.*.{local}")
    if local in HOOKS_BY_NAME:         # a real hook point this run does not have (no RoPE, no mask, no layer L)
        what = HOOKS_BY_NAME[local].what
        missing = f"layer {layer}" if layer is not None and everywhere else f"this run ({what})"
        raise input_error("ATT-E015", f"hook point '{name}' is not part of {missing}", location,
                          hint="`attntrace hooks SPEC` lists the hook points of a spec")
    local_names = sorted({split_name(n)[1] for n in names})
    hint = did_you_mean(local, local_names + list(ALIASES), n=2, cutoff=0.5)
    if hint is None and not local.startswith("attn.") and "attn." + local in local_names:
        hint = f"did you mean 'attn.{local}'?"
    raise input_error("ATT-E015", f"unknown hook '{name}'", location,
                      hint=hint or "`attntrace hooks` lists every hook point")


def _spellings(name: str) -> Tuple[str, ...]:
    """The ways a pattern may name a hook: its full name, its local name in every block, and
    `blocks.0.` before the short names of a one-layer trace."""
    layer, local = split_name(name)
    if layer is not None:
        return name, local
    point = HOOKS_BY_NAME.get(name)
    return (name, "blocks.0." + name) if point is not None and point.scope == BLOCK else (name,)


def match_hooks(pattern: str, available: Optional[Sequence[str]], location: Optional[Location] = None) -> List[str]:
    """Hook names matching a name, alias or glob such as `attn.hook_*` or `blocks.*.attn.hook_pattern`.

    A short name or glob without `blocks.` matches that hook in every block."""
    if available is None:                     # checking a name against the vocabulary, before a run
        return [resolve_hook_name(pattern, location)] if not any(ch in pattern for ch in "*?[") else [pattern]
    if any(ch in pattern for ch in "*?["):
        matched = [n for n in available if any(fnmatch.fnmatchcase(s, pattern) for s in _spellings(n))]
        if not matched:
            raise input_error("ATT-E015", f"hook pattern '{pattern}' matches no hook point of this run",
                              location, hint="`attntrace hooks SPEC` lists the hook points of a spec")
        return matched
    layer, local = split_name(pattern)
    local = ALIASES.get(local, local)
    if layer is None:
        everywhere = _layers_of(available, local)
        if len(everywhere) > 1:
            return everywhere
    return [resolve_hook_name(pattern, location, available)]
