"""Head scores for a head finder: what each layer × head of a model does with its attention.

Input: attention patterns, one (batch, heads, seq_q, seq_k) array per layer (a 5-D array
(layers, batch, heads, seq_q, seq_k), a list of 4-D arrays, or one 4-D array for one layer),
rows summing to 1, or to 0 for a fully masked row.  Query i sits at key position
i + seq_k − seq_q (attntrace's bottom-right alignment; i itself when the pattern is square).

Padding: with a key-padding mask (True = real token), weight on padded keys is dropped
(not redistributed) and rows of padded queries are left out (in self-attention query i is
padded when key i is).  Fully masked rows (all weights 0) are left out too.  A score is the
mean over the valid rows of each batch item, then the mean over the batch items that have
such rows (NaN when none has): every sequence counts the same, as in TransformerLens'
detect_head on a list of sequences.

Scores (each a (layers, heads) float64 array; SCORE_INFO holds the same table):

    entropy          −Σ_j p_ij ln p_ij, nats
    entropy_norm     entropy / ln(number of visible keys): 0 = one key, 1 = uniform over the
                     visible keys (0 for a row that sees a single key).  Visible keys are `keep`
                     when given, else the real keys with a non-zero weight
    max_weight       max_j p_ij (mean over rows of the row max)
    sink             weight on the attention-sink positions: by default the first real token
                     of each item (BOS / [CLS] / the first token); `sink_positions` overrides
    sep              weight on [SEP] / EOS positions: `sep_positions`, else the tokens whose
                     string is in SEP_TOKENS (not counting the sink position: GPT-2 uses
                     <|endoftext|> as BOS); items without any such position are left out
    previous_token   p_i,i−1, over rows that have a real previous token (so a pure
                     previous-token head scores exactly 1; TransformerLens' version also
                     counts the first row, which has no previous token: its value is this one
                     × (n − 1)/n on an unpadded sequence of n tokens)
    same_token       p_ii, the diagonal (weight on the query's own position)
    distance         Σ_j p_ij |i − j|, mean attention distance in positions
    duplicate_token  }  exactly TransformerLens' head detector (transformer_lens/head_detector.py,
    induction        }  detect_head with error_measure="mul"): for one sequence,
                        score = Σ_ij A_ij·D_ij / Σ_ij A_ij, with the detection pattern
                          duplicate: D_ij = 1 when t_i == t_j and j < i,
                          induction: D_ij = 1 when t_i == t_(j−1) and 1 ≤ j ≤ i
                        (get_duplicate_token_head_detection_pattern; the induction pattern is it
                        shifted one key right, then lower-triangular).  exclude_bos zeroes the
                        first real key's column of A, exclude_current_token its diagonal, as
                        there.  Padded tokens take part in neither A nor D; with left or right
                        padding this is TL's score on the unpadded tokens (neighbours are by
                        position, so a gap of padding inside a sequence is not bridged).  Meant for a pattern
                        of a repeated random sequence (repeated_random_tokens): a perfect
                        induction head that parks on BOS in the first half scores
                        n / (2n + 1) on BOS + n tokens + the same n tokens, and exactly 1 with
                        exclude_bos=True.

The offset profile (HeadScores.offset_profile) is the mean weight at each relative key
position d = j − i for d in −max_offset..max_offset (0 where no such key exists); its sparkline
reads left = keys before the query, middle = the query itself, right = keys after it.  A
previous-token head shows one bar just left of the middle; a causal head has nothing right of it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from attntrace.errors import Location, input_error

SCORE_INFO: dict[str, str] = {
    "entropy": "−Σ p ln p of a query row, nats",
    "entropy_norm": "entropy / ln(visible keys): 0 = one key, 1 = uniform",
    "max_weight": "largest weight of a query row",
    "sink": "weight on the first token / BOS / [CLS] (attention sink)",
    "sep": "weight on [SEP] / EOS tokens",
    "previous_token": "weight on the key just before the query",
    "same_token": "weight on the query's own position (diagonal)",
    "distance": "Σ p |i − j|: mean attention distance, positions",
    "duplicate_token": "share on earlier copies of the query's token (TransformerLens)",
    "induction": "share on the token after an earlier copy of the query's token (TransformerLens)",
}
SCORES: tuple[str, ...] = tuple(SCORE_INFO)
TOKEN_SCORES = ("duplicate_token", "induction")          # need token ids
SEP_TOKENS = frozenset({"[SEP]", "</s>", "<|endoftext|>", "<eos>", "<|eot_id|>", "<|end_of_text|>", "<|im_end|>",
                        "<|end|>"})
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
ROW_SUM_TOLERANCE = 1e-3


def _where(name: str) -> Location:
    return Location(None, None, None, name)


# --------------------------------------------------------------------------- inputs

def _layers(pattern) -> list[np.ndarray]:
    """The pattern as a list of (batch, heads, seq_q, seq_k) float arrays, all of one shape."""
    if isinstance(pattern, (list, tuple)):
        layers = [np.asarray(layer) for layer in pattern]
    else:
        array = np.asarray(pattern)
        layers = [array] if array.ndim == 4 else list(array) if array.ndim == 5 else [array]
    if not layers:
        raise input_error("ATT-E400", "no attention patterns given", _where("pattern"),
                          hint="pass one (batch, heads, seq_q, seq_k) array per layer")
    for index, layer in enumerate(layers):
        if layer.ndim != 4 or 0 in layer.shape or layer.dtype.kind not in "fiu":
            raise input_error("ATT-E400", f"pattern of layer {index} must be a non-empty numeric (batch, heads, "
                              f"seq_q, seq_k) array, got shape {layer.shape} of {layer.dtype}",
                              _where(f"pattern[{index}]"), hint="e.g. the hook attn.hook_pattern of each layer")
        if layer.shape != layers[0].shape:
            raise input_error("ATT-E400", f"layer {index} has pattern shape {layer.shape}, layer 0 has "
                              f"{layers[0].shape}", _where(f"pattern[{index}]"),
                              hint="score layers of one run (same batch, heads and tokens)")
    return layers


def _checked_values(p: np.ndarray, layer: int) -> None:
    """Refuse what is not an attention pattern: NaN/inf, negative weights, rows summing to neither 0 nor 1."""
    if not np.isfinite(p).all() or (p < 0).any():
        raise input_error("ATT-E406", f"pattern of layer {layer} holds NaN, inf or negative values",
                          _where(f"pattern[{layer}]"), hint="head scores need softmax weights (0 ≤ p ≤ 1)")
    sums = p.sum(axis=-1)
    off = (np.abs(sums - 1) > ROW_SUM_TOLERANCE) & (sums > ROW_SUM_TOLERANCE)
    if off.any():
        b, h, i = (int(x) for x in np.argwhere(off)[0])
        raise input_error("ATT-E406", f"pattern of layer {layer}: row {i} of head {h}, batch item {b} sums to "
                          f"{sums[b, h, i]:.6g}, not 1 (or 0 for a fully masked row)", _where(f"pattern[{layer}]"),
                          hint="pass the softmax output (attn.hook_pattern), not scores or an average over rows")


def _positions_mask(value, batch: int, seq_k: int, name: str) -> np.ndarray | None:
    """(batch, seq_k) bool from a (seq_k,) / (batch, seq_k) bool array or a list of key indices."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype == bool and array.shape in ((seq_k,), (batch, seq_k)):
        return np.broadcast_to(array, (batch, seq_k))
    if array.dtype.kind in "iu" and array.ndim <= 1 and np.all((array >= -seq_k) & (array < seq_k)):
        mask = np.zeros(seq_k, dtype=bool)
        mask[array] = True
        return np.broadcast_to(mask, (batch, seq_k))
    raise input_error("ATT-E401", f"{name} must be bool of shape ({seq_k},) or ({batch}, {seq_k}), or key indices "
                      f"in 0..{seq_k - 1}; got shape {array.shape} of {array.dtype}", _where(name),
                      hint="True (or an index) marks a key position")


def _token_ids(token_ids, batch: int, seq: int) -> np.ndarray | None:
    if token_ids is None:
        return None
    ids = np.asarray(token_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] != seq or ids.shape[0] not in (1, batch):
        raise input_error("ATT-E402", f"token_ids must be integers of shape ({batch}, {seq}) or ({seq},), got "
                          f"shape {np.shape(token_ids)} of {ids.dtype}", _where("token_ids"),
                          hint="the ids the patterns were computed on, e.g. repeated_random_tokens(...)")
    return np.broadcast_to(ids, (batch, seq))


def _token_strings(tokens, batch: int, seq: int) -> list[list[str]] | None:
    if tokens is None:
        return None
    rows = [list(tokens)] * batch if tokens and isinstance(tokens[0], str) else [list(row) for row in tokens]
    if len(rows) != batch or any(len(row) != seq for row in rows):
        raise input_error("ATT-E402", f"tokens must be {seq} strings, or {batch} lists of {seq} strings, got "
                          f"{len(rows)} list(s) of lengths {sorted({len(r) for r in rows})}", _where("tokens"),
                          hint="one string per key position")
    return rows


# --------------------------------------------------------------------------- per-row quantities

def _mean_over_rows(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(batch, heads, rows) -> (heads,): the mean over valid rows of each item, then over items."""
    counts = valid.sum(axis=-1)
    totals = np.where(valid, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_item = totals / counts                                   # NaN for an item without valid rows
    return _mean_over_items(per_item)


def _mean_over_items(per_item: np.ndarray) -> np.ndarray:
    """(batch, ...) -> (...): the mean over batch items, skipping NaN items; NaN where every item is NaN."""
    present = ~np.isnan(per_item)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, per_item, 0.0).sum(axis=0) / present.sum(axis=0)


def _row_entry(p: np.ndarray, key: np.ndarray, exists: np.ndarray) -> np.ndarray:
    """p[b, h, i, key[i]] (0 where exists[i] is False)."""
    picked = np.take_along_axis(p, np.where(exists, key, 0)[None, None, :, None], axis=-1)[..., 0]
    return np.where(exists, picked, 0.0)


def _entropy(p: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row entropy in nats (0·ln 0 = 0) and entropy / ln(visible keys), 0 for one visible key."""
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    entropy = -np.einsum("bhqk,bhqk->bhq", p, logs)
    entropy = np.maximum(entropy, 0.0)                                # −0 and rounding below 0
    n_visible = visible.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(n_visible > 1, entropy / np.log(np.maximum(n_visible, 2)), 0.0)
    return entropy, normalised


@dataclass
class _Context:
    """What every layer shares: positions, which tokens are real, the special positions, the detection patterns."""

    query_pos: np.ndarray          # (seq_q,) key position of each query
    key_real: np.ndarray           # (batch, seq_k)
    query_real: np.ndarray         # (batch, seq_q)
    sink: np.ndarray               # (batch, seq_k)
    sep: np.ndarray | None         # (batch, seq_k) or None
    first_real: np.ndarray         # (batch,) the first real key of each item
    keep: np.ndarray | None
    detection: dict[str, np.ndarray] = field(default_factory=dict)   # name -> (batch, seq, seq) bool


def _context(shape, key_mask, sink_positions, sep_positions, tokens, token_ids, keep) -> _Context:
    batch, _, seq_q, seq_k = shape
    key_real = _positions_mask(key_mask, batch, seq_k, "key_mask")
    key_real = np.ones((batch, seq_k), dtype=bool) if key_real is None else key_real
    query_pos = np.arange(seq_q) + (seq_k - seq_q)
    inside = (query_pos >= 0) & (query_pos < seq_k)
    query_real = np.where(inside[None], key_real[:, np.clip(query_pos, 0, seq_k - 1)], True)
    first_real = np.argmax(key_real, axis=1)
    sink = _positions_mask(sink_positions, batch, seq_k, "sink_positions")
    if sink is None:
        sink = np.zeros((batch, seq_k), dtype=bool)
        sink[np.arange(batch), first_real] = key_real.any(axis=1)
    sep = _positions_mask(sep_positions, batch, seq_k, "sep_positions")
    strings = _token_strings(tokens, batch, seq_k)
    if sep is None and strings is not None:
        sep = np.array([[t in SEP_TOKENS for t in row] for row in strings], dtype=bool) & ~sink
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        try:
            np.broadcast_shapes(keep.shape, shape)
        except ValueError:
            raise input_error("ATT-E401", f"keep mask of shape {keep.shape} does not broadcast to the pattern "
                              f"{shape}", _where("keep"), hint="the attention mask, e.g. attn.hook_mask") from None
    context = _Context(query_pos, key_real, query_real, sink, sep, first_real, keep)
    ids = _token_ids(token_ids, batch, seq_k)
    if ids is not None:
        if seq_q != seq_k:
            raise input_error("ATT-E403", f"duplicate-token and induction scores need a square pattern (self-"
                              f"attention over the token ids), got seq_q={seq_q}, seq_k={seq_k}",
                              _where("token_ids"), hint="score the full self-attention pattern, not a decoding step")
        context.detection = detection_patterns(ids, key_real)
    return context


def detection_patterns(token_ids: np.ndarray, real: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """TransformerLens' duplicate-token and induction detection patterns, (batch, seq, seq) bool.

    duplicate: t_i == t_j and j < i; induction: t_i == t_(j−1) and 1 ≤ j ≤ i
    (head_detector.get_duplicate_token_head_detection_pattern and get_induction_head_detection_pattern).
    With `real` (batch, seq), padded tokens take part in neither.
    """
    ids = np.asarray(token_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    seq = ids.shape[1]
    real = np.ones(ids.shape, dtype=bool) if real is None else real
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    both_real = real[:, :, None] & real[:, None, :]
    duplicate = (ids[:, :, None] == ids[:, None, :]) & (j < i) & both_real
    induction = np.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1] & real[:, None, 1:]       # shift one key right
    induction &= j <= i                                                  # then lower-triangular, as TL
    return {"duplicate_token": duplicate, "induction": induction}


def _layer_scores(p: np.ndarray, ctx: _Context, exclude_bos: bool, exclude_current_token: bool,
                  max_offset: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every score of one layer, (heads,) each, and its (heads, 2·max_offset + 1) offset profile."""
    heads, seq_k = p.shape[1], p.shape[3]
    p = p * ctx.key_real[:, None, None, :]                    # weight on padding is dropped
    valid = ctx.query_real[:, None, :] & (p.sum(axis=-1) > 0)
    visible = (p > 0) if ctx.keep is None else (np.broadcast_to(ctx.keep, p.shape) & ctx.key_real[:, None, None, :])
    entropy, normalised = _entropy(p, visible)
    pos, keys = ctx.query_pos, np.arange(seq_k)
    previous_exists = (pos - 1 >= 0) & (pos - 1 < seq_k)
    previous_real = previous_exists[None] & ctx.key_real[:, np.clip(pos - 1, 0, seq_k - 1)]
    self_exists = (pos >= 0) & (pos < seq_k)
    distance = np.abs(pos[:, None] - keys[None, :]).astype(np.float64)
    scores = {
        "entropy": _mean_over_rows(entropy, valid),
        "entropy_norm": _mean_over_rows(normalised, valid),
        "max_weight": _mean_over_rows(p.max(axis=-1), valid),
        "sink": _mean_over_rows(np.einsum("bhqk,bk->bhq", p, ctx.sink.astype(np.float64)), valid),
        "previous_token": _mean_over_rows(_row_entry(p, pos - 1, previous_exists), valid & previous_real[:, None]),
        "same_token": _mean_over_rows(_row_entry(p, pos, self_exists), valid & self_exists),
        "distance": _mean_over_rows(np.einsum("bhqk,qk->bhq", p, distance), valid),
    }
    if ctx.sep is not None:
        has_sep = ctx.sep.any(axis=1)[:, None, None]
        scores["sep"] = _mean_over_rows(np.einsum("bhqk,bk->bhq", p, ctx.sep.astype(np.float64)), valid & has_sep)
    else:
        scores["sep"] = np.full(heads, np.nan)
    for name in TOKEN_SCORES:
        scores[name] = (_detection_score(p, valid, ctx, name, exclude_bos, exclude_current_token)
                        if ctx.detection else np.full(heads, np.nan))
    offsets = np.arange(-max_offset, max_offset + 1)
    target = pos[:, None] + offsets[None, :]                             # (seq_q, offsets)
    exists = (target >= 0) & (target < seq_k)
    at_offset = np.take_along_axis(p, np.clip(target, 0, seq_k - 1)[None, None], axis=-1) * exists
    per_item = np.where(valid[..., None], at_offset, 0.0).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_item = per_item / valid.sum(axis=-1)[..., None]                # (batch, heads, offsets)
    return {name: scores[name] for name in SCORES}, _mean_over_items(per_item)


def _detection_score(p, valid, ctx: _Context, name: str, exclude_bos: bool, exclude_current_token: bool):
    """Σ A·D / Σ A per item (TransformerLens' "mul" measure), then the mean over items."""
    attention = p * valid[..., None]
    if exclude_bos:
        attention[np.arange(p.shape[0]), :, :, ctx.first_real] = 0.0
    if exclude_current_token:
        diagonal = np.arange(p.shape[2])
        attention[:, :, diagonal, diagonal] = 0.0
    matched = np.einsum("bhqk,bqk->bh", attention, ctx.detection[name].astype(np.float64))
    total = attention.sum(axis=(2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return _mean_over_items(matched / total)


# --------------------------------------------------------------------------- public API

class RankedHead(NamedTuple):
    layer: int
    head: int
    value: float


@dataclass
class HeadScores:
    """Scores of every layer × head: `scores[name]` is (layers, heads) float64, NaN where undefined."""

    scores: dict[str, np.ndarray]
    offset_profile: np.ndarray              # (layers, heads, 2·max_offset + 1) mean weight at key offset j − i
    max_offset: int
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.offset_profile.shape[0]

    @property
    def n_heads(self) -> int:
        return self.offset_profile.shape[1]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.scores[name]

    def head(self, layer: int, head: int) -> dict[str, float]:
        return {name: float(values[layer, head]) for name, values in self.scores.items()}

    def sparkline(self, layer: int, head: int) -> str:
        """The head's offset profile as block characters on a 0..1 scale (see the module docstring)."""
        return sparkline(self.offset_profile[layer, head], lo=0.0, hi=1.0)

    def to_json(self) -> dict[str, Any]:
        def plain(values: np.ndarray):
            return [[None if np.isnan(x) else float(x) for x in row] for row in values]
        return {"layers": self.n_layers, "heads": self.n_heads, "scores": {n: plain(v) for n, v in self.scores.items()},
                "score_info": dict(SCORE_INFO), "max_offset": self.max_offset,
                "offset_profile": [plain(layer) for layer in self.offset_profile], "notes": list(self.notes)}


def head_scores(pattern, *, key_mask=None, token_ids=None, tokens: Sequence | None = None, sink_positions=None,
                sep_positions=None, keep=None, exclude_bos: bool = False, exclude_current_token: bool = False,
                max_offset: int = 8) -> HeadScores:
    """Every score of SCORE_INFO for every layer × head (see the module docstring for definitions).

    pattern: (layers, batch, heads, seq_q, seq_k), a list of per-layer (batch, heads, seq_q, seq_k)
    arrays, or one 4-D array.  key_mask: (seq_k,) or (batch, seq_k), True = real token.
    token_ids: (batch, seq) or (seq,) ids, needed for duplicate_token and induction (NaN without).
    tokens: token strings ((seq,) or (batch, seq)), used to find [SEP]/EOS when sep_positions is
    not given.  sink_positions / sep_positions: bool (seq_k,) / (batch, seq_k) or key indices.
    keep: the attention mask (broadcastable to the pattern, True = may attend), for entropy_norm.
    exclude_bos / exclude_current_token: TransformerLens' options, for the two token scores.
    Works layer by layer (vectorised over batch, heads and rows) so temporaries stay one layer big.
    """
    if isinstance(max_offset, bool) or not isinstance(max_offset, (int, np.integer)) or max_offset < 0:
        raise input_error("ATT-E407", f"max_offset must be a non-negative integer, got {max_offset!r}",
                          _where("max_offset"), hint="e.g. 8: keys up to 8 positions either side")
    layers = _layers(pattern)
    ctx = _context(layers[0].shape, key_mask, sink_positions, sep_positions, tokens, token_ids, keep)
    per_layer, profiles = [], []
    for index, layer in enumerate(layers):
        p = np.asarray(layer, dtype=np.float64)
        _checked_values(p, index)
        scores, profile = _layer_scores(p, ctx, exclude_bos, exclude_current_token, max_offset)
        per_layer.append(scores)
        profiles.append(profile)
    notes = []
    if ctx.sep is None:
        notes.append("sep: no [SEP]/EOS positions (pass sep_positions or token strings)")
    if not ctx.detection:
        notes.append("duplicate_token, induction: need token_ids (score a repeated random sequence)")
    return HeadScores({name: np.stack([s[name] for s in per_layer]) for name in SCORES}, np.stack(profiles),
                      int(max_offset), notes)


def repeated_random_tokens(vocab_size: int, length: int, seed: int = 0, *, special_ids: Sequence[int] = (),
                           bos_id: int | None = None, eos_id: int | None = None, batch: int = 1,
                           distinct: bool = True) -> np.ndarray:
    """(batch, [BOS] + r + r + [EOS]) int64 ids: `length` random tokens r, then the same tokens again.

    The random tokens avoid `special_ids` (and bos_id / eos_id).  distinct=True draws them without
    replacement, so the only repeats are the designed ones (the second half); False draws with
    replacement, like TransformerLens' demos.  Each batch item is a different random sequence;
    the same seed gives the same ids.
    """
    for name, value, least in (("vocab_size", vocab_size, 1), ("length", length, 1), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise input_error("ATT-E404", f"{name} must be an integer ≥ {least}, got {value!r}", _where(name),
                              hint="e.g. repeated_random_tokens(vocab_size=30522, length=50, seed=0)")
    excluded = {int(i) for i in special_ids} | {i for i in (bos_id, eos_id) if i is not None}
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    if allowed.size == 0 or (distinct and allowed.size < length):
        raise input_error("ATT-E404", f"cannot draw {length} {'distinct ' if distinct else ''}tokens from "
                          f"{allowed.size} usable ids (vocab_size={vocab_size}, {len(excluded)} special)",
                          _where("repeated_random_tokens"),
                          hint="use a shorter length, or distinct=False to allow repeats")
    rng = np.random.default_rng(seed)
    halves = np.stack([rng.choice(allowed, size=length, replace=not distinct) for _ in range(batch)])
    parts = [np.full((batch, 1), bos_id)] if bos_id is not None else []
    parts += [halves, halves]
    parts += [np.full((batch, 1), eos_id)] if eos_id is not None else []
    return np.concatenate(parts, axis=1).astype(np.int64)


def rank_heads(scores: HeadScores, by: str, top: int | None = None, descending: bool = True) -> list[RankedHead]:
    """Heads sorted by one score (highest first unless descending=False), NaN last; the first `top`."""
    if by not in scores.scores:
        raise input_error("ATT-E405", f"unknown head score {by!r}", _where("by"),
                          hint="one of " + ", ".join(scores.scores))
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise input_error("ATT-E405", f"top must be a positive integer, got {top!r}", _where("top"),
                          hint="e.g. top=10")
    values = scores.scores[by].ravel()
    key = np.where(np.isnan(values), np.inf, -values if descending else values)
    order = np.argsort(key, kind="stable")                               # ties keep layer, head order
    heads = scores.scores[by].shape[1]
    ranked = [RankedHead(int(i // heads), int(i % heads), float(values[i])) for i in order]
    return ranked if top is None else ranked[:top]


def sparkline(values, lo: float | None = None, hi: float | None = None, width: int | None = None) -> str:
    """Block characters ▁..█ for a vector; NaN is a space.

    lo / hi: the values drawn as ▁ and █ (default: min(0, smallest) and the largest, so weights
    keep their zero).  width: pool to this many characters by averaging near-equal runs.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise input_error("ATT-E407", f"sparkline width must be a positive integer, got {width!r}",
                              _where("width"), hint="e.g. width=16")
        if data.size > width:                                      # mean of near-equal runs, NaN-aware
            starts = (np.arange(width) * data.size) // width
            present = ~np.isnan(data)
            with np.errstate(invalid="ignore", divide="ignore"):
                data = np.add.reduceat(np.where(present, data, 0.0), starts) / np.add.reduceat(present, starts)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return " " * data.size
    lo = min(0.0, float(finite.min())) if lo is None else lo
    hi = float(finite.max()) if hi is None else hi
    span = hi - lo
    levels = np.zeros(data.size, dtype=int) if span <= 0 else \
        np.clip(np.round((np.nan_to_num(data, nan=lo) - lo) / span * (len(SPARK_BLOCKS) - 1)), 0,
                len(SPARK_BLOCKS) - 1).astype(int)
    return "".join(" " if np.isnan(x) else SPARK_BLOCKS[level] for x, level in zip(data, levels))
