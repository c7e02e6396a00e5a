"""Masks explained: their conventions, names for combinations, and their effect on a spec.

The mask math lives in :mod:`attntrace.core.masks`; this module holds what
``attntrace mask`` says about a mask (which libraries write it which way, what
a fully masked row turns into) and runs a spec with and without it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from attntrace.analysis.run import run
from attntrace.core.masks import empty_rows, to_convention, visible_counts
from attntrace.errors import Diagnosis
from attntrace.inputs.sources import Array
from attntrace.inputs.spec import MaskSpec


@dataclass(frozen=True)
class ConventionNote:
    """How one convention writes "may attend" and "blocked", and who uses it."""

    name: str
    allowed: str
    blocked: str
    used_by: str
    apply: str          # how the mask meets the scores


CONVENTION_NOTES: Tuple[ConventionNote, ...] = (
    ConventionNote("allow", "True / 1", "False / 0",
                   "PyTorch F.scaled_dot_product_attention (boolean attn_mask); the Annotated "
                   "Transformer and seed 001 (masked_fill(mask == 0, -1e9)); attntrace's attn.hook_mask",
                   "scores.masked_fill(~mask, -inf)"),
    ConventionNote("ignore", "False / 0", "True / 1",
                   "nn.MultiheadAttention / nn.Transformer key_padding_mask and boolean attn_mask; "
                   "seed 004's create_padding_mask (seq == pad) and create_causal_mask (np.triu(.., k=1))",
                   "scores.masked_fill(mask, -inf)"),
    ConventionNote("additive", "0", "-inf",
                   "float attn_mask in PyTorch (SDPA, nn.MultiheadAttention); "
                   "nn.Transformer.generate_square_subsequent_mask",
                   "scores + mask"),
    ConventionNote("additive-1e9", "0", "-1e9 (a large negative)",
                   "seed 004's numpy code (scores + mask · -1e9); older TensorFlow/BERT code (-10000); "
                   "Hugging Face uses torch.finfo(dtype).min",
                   "scores + mask"),
)
CONVENTION_BY_NAME: Dict[str, ConventionNote] = {c.name: c for c in CONVENTION_NOTES}


def describe_kinds(causal_: bool = False, padding_rows: int = 0, window_size: Optional[int] = None,
                   prefix: Optional[int] = None, matrix: bool = False) -> str:
    """A one-line name of a combination of mask kinds ("causal + window=3 + padding")."""
    parts = []
    if prefix:
        parts.append(f"prefix-LM (prefix={prefix})")
    elif causal_:
        parts.append("causal")
    if window_size:
        parts.append(f"sliding window={window_size}" + (" (looking back)" if causal_ or prefix else " (both sides)"))
    if padding_rows:
        parts.append("padding" + (f" ({padding_rows} batch items)" if padding_rows > 1 else ""))
    if matrix:
        parts.append("explicit matrix")
    return " AND ".join(parts) or "none (every query sees every key)"


@dataclass
class MaskPicture:
    """Everything `attntrace mask` shows, computed here so renderers only lay it out."""

    keep: np.ndarray                    # (batch or 1, 1, seq_q, seq_k), True = may attend
    description: str
    query_tokens: List[str]
    key_tokens: List[str]
    convention: str = "additive"        # the form printed next to the grid

    @property
    def batch(self) -> int:
        return self.keep.shape[0]

    @property
    def seq_q(self) -> int:
        return self.keep.shape[2]

    @property
    def seq_k(self) -> int:
        return self.keep.shape[3]

    def in_convention(self, convention: Optional[str] = None) -> np.ndarray:
        return to_convention(self.keep, convention or self.convention)

    @property
    def empty_rows(self) -> List[Tuple[int, int]]:
        return empty_rows(self.keep)

    @property
    def visible(self) -> np.ndarray:
        return visible_counts(self.keep)

    def row_name(self, batch_item: int, query: int) -> str:
        token = self.query_tokens[query] if query < len(self.query_tokens) else str(query)
        where = f"query {query}" if token == str(query) else f"query {query} '{token}'"
        return f"{where} of batch item {batch_item}" if self.batch > 1 else where


def without_mask(spec):
    """A copy of the spec with no mask (the arrays are shared, not copied)."""
    return _with_mask_spec(spec, MaskSpec(location=spec.attention_of(0).mask.location))


def with_keep(spec, keep: np.ndarray):
    """A copy of the spec whose mask is the explicit (batch or 1, 1, seq_q, seq_k) `keep`."""
    location = spec.attention_of(0).mask.location
    matrix = keep[0, 0] if keep.shape[0] == 1 else keep[:, 0]
    return _with_mask_spec(spec, MaskSpec(matrix=Array("mask", matrix, location), location=location))


def _with_mask_spec(spec, mask_spec):
    """Every block gets `mask_spec` (a model's blocks share one mask)."""
    for layer in range(len(spec.blocks)):
        spec = spec.with_attention(layer if spec.is_model else None,
                                   replace(spec.attention_of(layer), mask=mask_spec))
    return spec


def before_after(spec, keep: Optional[np.ndarray] = None):
    """Traces of `spec` run without any mask and with `keep` (default: the spec's own mask)."""
    masked = spec if keep is None else with_keep(spec, keep)
    return (run(without_mask(spec), keep={"attn.hook_pattern"}),
            run(masked, keep={"attn.hook_pattern", "attn.hook_mask"}))


def empty_row_warning(picture: MaskPicture) -> Optional[Diagnosis]:
    """ATT-W203 when some query may attend to no key, with what each convention makes of it."""
    if not picture.empty_rows:
        return None
    names = ", ".join(picture.row_name(b, q) for b, q in picture.empty_rows[:8])
    more = " ..." if len(picture.empty_rows) > 8 else ""
    return Diagnosis("ATT-W203", f"{names}{more} may attend to no key: softmax of an all-blocked row is NaN with "
                                 "-inf and uniform (1/seq_k, attending to padding) with -1e9; attntrace and "
                                 "PyTorch SDPA give zeros", severity="warning", hook="attn.hook_mask",
                     hint="every query usually needs at least one visible key (is a whole batch item padding?)")
