"""The head finder: every layer × head of a trace scored, and ranked (`attntrace heads`).

The scores and their definitions are :mod:`attntrace.analysis.heads`'; this
module gets the patterns.  It traces the spec (or model) once for the scores of
the text itself, and — for a real model — once more on a repeated random
sequence (BOS + r + r, as TransformerLens' head detector) for the
duplicate-token and induction scores, whose meaning needs repeats.  For a
hand-written spec those two are scored on its own tokens (repeats by spelling).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from attntrace.analysis.heads import (
    SCORES,
    TOKEN_SCORES,
    HeadScores,
    RankedHead,
    head_scores,
    rank_heads,
    repeated_random_tokens,
)
from attntrace.analysis.run import load, run
from attntrace.core.masks import build as build_mask

REPEAT_LENGTH = 20       # random tokens in each half of the repeated sequence


@dataclass
class HeadReport:
    scores: HeadScores
    ranked: List[RankedHead]
    sort: str
    tokens: List[str]
    layer_names: List[str]
    how: Dict[str, str] = field(default_factory=dict)      # how the token scores were measured

    def to_json(self) -> Dict:
        return {"attntrace": 1, "sort": self.sort, "tokens": self.tokens, "layer_names": self.layer_names,
                "how": self.how, **self.scores.to_json(),
                "ranked": [{"layer": r.layer, "head": r.head, "value": None if np.isnan(r.value) else r.value,
                            "scores": {k: (None if np.isnan(v) else v)
                                       for k, v in self.scores.head(r.layer, r.head).items()},
                            "sparkline": self.scores.sparkline(r.layer, r.head)} for r in self.ranked]}


def _patterns(trace) -> List[np.ndarray]:
    hooks = [s.hook for s in trace.plan.steps if s.key == "pattern"]
    return [np.asarray(trace[h], dtype=np.float64) for h in hooks]


def find_heads(source, *, sort: str = "max_weight", top: Optional[int] = None, seed: int = 0,
               repeat_length: int = REPEAT_LENGTH, trace=None) -> HeadReport:
    """Score every head of `source` (a spec path, dict or Spec; a `model:` spec for a real model)."""
    spec = trace.spec if trace is not None else load(source)
    if trace is None or not all(s.hook in trace.arrays for s in trace.plan.steps if s.key == "pattern"):
        trace = run(spec, keep="blocks.*.attn.hook_pattern" if spec.is_model else "attn.hook_pattern", check=False)
    plan = trace.plan
    keep = build_mask(spec.attention_of(0).mask, plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"))
    padding = spec.attention_of(0).mask.padding
    key_mask = None if padding is None else np.asarray(padding.data, dtype=bool)
    tokens = spec.batch_tokens or [list(spec.tokens)] * plan.size("batch")
    ids = spec.token_ids
    how = {}
    if ids is None:             # a hand-written spec: repeats by spelling
        vocabulary = {t: i for i, t in enumerate(dict.fromkeys(t for row in tokens for t in row))}
        ids = np.array([[vocabulary[t] for t in row] for row in tokens], dtype=np.int64)
        how = {name: "on the spec's own tokens (a repeat is the same spelling)" for name in TOKEN_SCORES}
    scores = head_scores(_patterns(trace), key_mask=key_mask, token_ids=ids, tokens=tokens, keep=keep)
    if spec.model is not None:
        repeated = _repeated(spec, seed, repeat_length)
        for name in TOKEN_SCORES:
            scores.scores[name] = repeated.scores[name]
        how = {name: f"on a repeated random sequence (BOS + {repeat_length} random tokens, twice; seed {seed}), "
                     "first key excluded, as TransformerLens' detect_head(exclude_bos=True)" for name in TOKEN_SCORES}
    names = [f"blocks.{layer}" for layer in range(len(spec.blocks))] if spec.is_model else ["attention"]
    return HeadReport(scores, rank_heads(scores, sort, top), sort, list(spec.tokens), names, how)


def _repeated(spec, seed: int, length: int) -> HeadScores:
    from attntrace.models.build import model_facts
    vocab, bos, special = model_facts(spec.model)
    ids = repeated_random_tokens(vocab, length, seed, special_ids=special, bos_id=bos)
    again = run({"model": spec.model.source, "ids": ids.tolist(), "dtype": spec.model.dtype or "float32",
                 **({"layers": spec.model.layers} if spec.model.layers else {})},
                keep="blocks.*.attn.hook_pattern", check=False)
    return head_scores(_patterns(again), token_ids=ids, exclude_bos=bos is not None)


__all__ = ["HeadReport", "find_heads", "SCORES"]
