"""The engine: executes a plan with vectorised numpy and fills a Trace.

Each step of the plan is a small function of the run's state.  Bugs
(:mod:`attntrace.analysis.bugs`) are alternative step functions, so
``--inject`` runs the same loop with one step swapped.  The engine only
executes: pre-flight diagnosis and invariant checks belong to
:func:`attntrace.analysis.run.run`, which calls :func:`execute` with an
``after_step`` callback that sees every step's live array.

After every step the hooks fire, stats are taken, and the array is kept only
when it is asked for, hooked, or small; score-sized steps work in place when
their input is not kept, so a 4k-token, 12-head layer needs one
(heads × seq × seq) buffer, not five.  A spec of transformer blocks runs
block after block; a block's arrays are dropped when the next block starts
(unless kept), so memory does not grow with the number of layers.

A long layer's score-sized steps run tile by tile, each step's stats taken from
its tiles while they are in cache (see "fused score steps" below); the trace is
the same as the plain steps' (tests/test_perf_fused.py compares the two).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterable, Optional, Set, Union

import numpy as np

from attntrace.core import masks, ops, positional
from attntrace.core.hooks import HookSet
from attntrace.core.memory import AUTO_KEEP_ELEMENTS, SCORE_BUFFER
from attntrace.core.plan import BlockPlan, Plan, Step
from attntrace.core.stats import (
    POOL_CELLS,
    PREVIEW_EDGE,
    Pooled,
    Stats,
    array_stats,
    grid_edges,
    pool,
    preview,
    row_winners,
    scaled_stats,
    stats_from_parts,
)
from attntrace.core.trace import Trace
from attntrace.errors import Diagnosis, ShapeError
from attntrace.hookpoints import full_name, match_hooks, point_of
from attntrace.inputs.spec import AttentionSpec, BlockSpec, Spec

# Below this many flops in its largest step, a run uses one BLAS thread: waking OpenBLAS's other
# threads for an (8 × 384)·(384 × 1536) product costs more than the product (measured here: 1 ms
# with one thread, 8 ms with two on a busy machine); big products still get every core.
ONE_THREAD_FLOPS = 2e8
# Below this, OpenBLAS already keeps every product on one thread (interface/gemm.c: M·N·K under
# 65536 × GEMM_MULTITHREAD_THRESHOLD (4), i.e. 2 × 262,144 flops), so the run does not load
# threadpoolctl, whose library scan costs ~8 ms: most of a toy spec's run.
BLAS_SINGLE_THREADED_FLOPS = 2 * 65536 * 4


class State:
    """The arrays of the steps run so far, with copy-on-write for kept ones.

    Step functions read the current block's arrays by step key (``state["q"]``);
    the embeddings' steps (``embed``, ``pos`` ...) are visible from every block."""

    def __init__(self, spec: Spec, plan: Plan, dtype: np.dtype):
        self.spec, self.plan, self.dtype = spec, plan, dtype
        self.model_values: Dict[str, np.ndarray] = {}    # embed, pos, embed_norm, encoder_embed, ln_final
        self.values: Dict[str, np.ndarray] = {}          # the current block's step key -> array
        self.protected: Set[str] = set()                 # kept or hooked: never modified in place
        self.layer: Optional[int] = None
        self.block_output: Optional[np.ndarray] = None   # the previous block's last step
        self.chunked = None                              # chunked attention's result, for its later steps
        self.fused: Dict[str, dict] = {}                 # step key -> stats (etc.) its tiles took on the way
        self.layouts: Dict[str, tuple] = {}              # step key -> (array, Bands): where it is -inf / 0
        self.bands = None                                # (mask, Bands) of the current block
        self.pool_wanted = False                         # the pattern step: take the pooled overview

    # -- the block being run -------------------------------------------------
    def enter(self, layer: int) -> None:
        """Start block `layer`: the previous block's arrays go (kept ones live on in the trace)."""
        self.layer = layer
        self.values = {}
        self.layouts, self.bands = {}, None
        self.protected = {key for key in self.protected if key.startswith("model:")}

    def stream(self) -> np.ndarray:
        """The residual stream entering the current step: the last block's output, else X."""
        return self.block_output if self.block_output is not None else self.embeddings()

    @property
    def block(self) -> BlockPlan:
        return self.plan.block(self.layer)

    @property
    def block_spec(self) -> BlockSpec:
        return self.spec.blocks[self.layer or 0]

    @property
    def attention(self) -> AttentionSpec:
        return self.block_spec.attention

    # -- reading ---------------------------------------------------------------
    def __getitem__(self, key: str) -> np.ndarray:
        if key in self.values:
            return self.values[key]
        return self.model_values[key]

    def __contains__(self, key: str) -> bool:
        return key in self.values or key in self.model_values

    def store(self, step: Step, array: np.ndarray) -> None:
        (self.values if step.layer is not None else self.model_values)[step.key] = array

    def protect(self, step: Step) -> None:
        self.protected.add(step.key if step.layer is not None else "model:" + step.key)

    def take(self, key: str) -> np.ndarray:
        """The array of `key` for in-place use (a copy when someone holds on to it)."""
        array = self.values[key]
        return array.copy() if key in self.protected else array

    def embeddings(self) -> np.ndarray:
        """X after positions and the embedding norm: the first block's input."""
        for key in ("embed_norm", "pos", "embed"):
            if key in self.model_values:
                return self.model_values[key]
        raise KeyError("embed")

    def x(self) -> np.ndarray:
        """The attention's input: ln1 (pre-norm), the block's input, or the embeddings."""
        if "ln1" in self.values and self.block.placement == "pre":
            return self.values["ln1"]
        if "resid_pre" in self.values:
            return self.values["resid_pre"]
        return self.embeddings()

    def x_kv(self) -> np.ndarray:
        return self.model_values["encoder_embed"] if "encoder_embed" in self.model_values else self.x()

    def cast(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, dtype=self.dtype)

    def optional(self, array_spec) -> Optional[np.ndarray]:
        return None if array_spec is None else self.cast(array_spec.data)


# --------------------------------------------------------------------------- embedding steps

def _batched(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array


def step_embed(state: State) -> np.ndarray:
    return state.cast(_batched(state.spec.source.embeddings.data))


def step_encoder_embed(state: State) -> np.ndarray:
    return state.cast(_batched(state.spec.encoder.embeddings.data))


def _leading_pads(spec: Spec, layer: Optional[int], width: int) -> Optional[np.ndarray]:
    """(batch,) pads before each item's first real token, from the mask's padding; None without left padding."""
    mask = spec.attention_of(layer).mask
    if mask.padding is None:
        return None
    keep = masks.from_matrix(mask.padding.data, mask.convention)
    keep = keep[None] if keep.ndim == 1 else keep
    lead = positional.leading_pads(keep)
    return lead if keep.shape[-1] == width and lead.any() else None


def token_positions(spec: Spec, plan: Plan, layer: Optional[int] = None):
    """Query and key positions (batch or 1, seq_q) and (batch or 1, seq_k) for RoPE: the queries
    are the last seq_q positions (the KV-cache offset of the masks), and a left-padded item
    counts from its first real token."""
    q, k = positional.rope_positions(plan.size("seq_q"), plan.size("seq_k"))
    lead = _leading_pads(spec, layer, len(k))
    if lead is None:
        return q[None], k[None]
    return positional.from_first_real_token(q, lead), positional.from_first_real_token(k, lead)


def embedding_positions(spec: Spec, seq: int) -> np.ndarray:
    """(batch or 1, seq) the rows of a position table each token gets: 0, 1, ... counted
    from each item's first real token (left padding); cross-attention counts from 0."""
    pos = np.arange(seq)
    lead = None if spec.is_cross else _leading_pads(spec, None, seq)
    return pos[None] if lead is None else positional.from_first_real_token(pos, lead)


def add_positions(state: State, rows: np.ndarray) -> np.ndarray:
    """X + PE[rows] (rows: (batch or 1, seq) positions), plus BERT's token-type rows."""
    pos = state.spec.positional
    x = state["embed"]
    seq, d_model = x.shape[1], x.shape[2]
    table = positional.sinusoidal(seq, d_model, pos.base) if pos.kind == "sinusoidal" else \
        positional.learned(pos.table.data, seq)
    x = x + state.cast(table)[rows]
    if pos.type_table is not None:          # BERT: the segment embedding of each token
        x += state.cast(pos.type_table.data)[np.asarray(pos.type_ids.data, dtype=np.int64)]
    return x


def step_pos(state: State) -> np.ndarray:
    return add_positions(state, embedding_positions(state.spec, state["embed"].shape[1]))


def _norm(state: State, norm, x: np.ndarray) -> np.ndarray:
    if norm.kind == "rmsnorm":
        return ops.rms_norm(x, state.optional(norm.weight), norm.eps)
    return ops.layer_norm(x, state.optional(norm.weight), state.optional(norm.bias), norm.eps)


def step_embed_norm(state: State) -> np.ndarray:
    x = state.model_values["pos"] if "pos" in state.model_values else state.model_values["embed"]
    return _norm(state, state.spec.embed_norm, x)


def step_ln_final(state: State) -> np.ndarray:
    return _norm(state, state.spec.final_norm, state.stream())


# --------------------------------------------------------------------------- attention steps

def project(state: State, x: np.ndarray, weight: str, bias: str, heads: int) -> np.ndarray:
    """x (batch, seq, d_model) -> (batch, seq, heads, width/heads)."""
    att = state.attention
    y = ops.linear(x, state.cast(getattr(att, weight).data), state.optional(getattr(att, bias)), att.layout)
    batch, seq, width = y.shape
    return y.reshape(batch, seq, heads, width // heads)


def step_q(state: State) -> np.ndarray:
    return project(state, state.x(), "W_q", "b_q", state.plan.size("n_heads"))


def step_k(state: State) -> np.ndarray:
    return project(state, state.x_kv(), "W_k", "b_k", state.plan.size("n_kv_heads"))


def step_v(state: State) -> np.ndarray:
    return project(state, state.x_kv(), "W_v", "b_v", state.plan.size("n_kv_heads"))


def _rotate(state: State, key: str) -> np.ndarray:
    """RoPE on Q or K (batch, seq, heads, d_head) at :func:`token_positions`."""
    x = state[key]
    if x.shape[-1] % 2:
        step, plan = state.plan.step("rot_" + key, state.layer), state.plan
        raise ShapeError(Diagnosis(
            code="ATT-E140", step=step.label, hook=step.hook, rule=step.rule,
            message=f"shape mismatch in step {step.label}: RoPE rotates pairs of features, "
                    f"but d_head={x.shape[-1]} is odd", bindings=[plan.dims["d_head"].describe()],
            locations=[loc for loc in (state.spec.positional.location,) if loc is not None],
            hint="use an even d_head (every RoPE model does), or another positional encoding"))
    pos = state.spec.positional
    q_pos, k_pos = token_positions(state.spec, state.plan, state.layer)
    return positional.rope(x, q_pos if key == "q" else k_pos, pos.base, pos.pairing)


def step_rot_q(state: State) -> np.ndarray:
    return _rotate(state, "q")


def step_rot_k(state: State) -> np.ndarray:
    return _rotate(state, "k")


def rotated_q_k(state: State):
    """Q and K as the scores see them: after RoPE when there is RoPE."""
    return (state["rot_q"] if "rot_q" in state else state["q"],
            state["rot_k"] if "rot_k" in state else state["k"])


def step_qk(state: State) -> np.ndarray:
    q, k = rotated_q_k(state)
    if _fused(state, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])):
        return fused_qk(state, q, k)
    return ops.grouped_scores(q, k)


def step_scaled(state: State) -> np.ndarray:
    scores = state.take("qk")
    factor = state.dtype.type(state.block.scale)
    if state.plan.positional == "alibi":      # ALiBi: a per-head linear bias on the scaled scores
        scores *= factor
        _, h, sq, sk = scores.shape
        scores += state.cast(positional.alibi_bias(h, sq, sk))
    elif _fused(state, scores.shape):
        fused_scale(state, scores, factor)
    else:
        scores *= factor
    return scores


def step_mask(state: State) -> np.ndarray:
    plan = state.plan
    return masks.build(state.attention.mask, plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"))


def step_attn_scores(state: State) -> np.ndarray:
    scores = state.take("scaled")
    if "mask" in state:
        if _fused(state, scores.shape):
            return fused_mask(state, scores, state["mask"])
        np.copyto(scores, state.dtype.type(-np.inf), where=~state["mask"])
    return scores


def step_pattern(state: State) -> np.ndarray:
    layout = state.layouts.get("attn_scores")
    scores = state.take("attn_scores")
    if not _fused(state, scores.shape):
        return ops.softmax(scores)
    if layout is None or layout[0] is not state["attn_scores"]:
        layout = (None, Bands(scores.shape[2], scores.shape[3], scores.dtype.itemsize, None), None)
    return fused_softmax(state, scores, layout[1], state.pool_wanted, layout[2])


def step_z(state: State) -> np.ndarray:
    pattern, v = state["pattern"], state["v"]
    layout = state.layouts.get("pattern")
    if layout is not None and layout[0] is pattern and _fused(state, pattern.shape) and np.isfinite(v).all():
        return fused_mix(state, pattern, v, layout[1])        # (0 · NaN is NaN: a NaN in V takes every key)
    return ops.grouped_mix(pattern, v)


def step_z_concat(state: State) -> np.ndarray:
    z = state["z"]
    b, sq, h, dv = z.shape
    return z.reshape(b, sq, h * dv)


def step_out(state: State) -> np.ndarray:
    att = state.attention
    concat = state["z_concat"]
    if att.W_o is None:
        return concat.copy()
    return ops.linear(concat, state.cast(att.W_o.data), state.optional(att.b_o), att.layout)


# --------------------------------------------------------------------------- fused score steps
#
# A long layer's score-sized steps (qk, scaled, attn_scores, pattern, z) run tile by tile: a tile is
# one head's band of query rows (about FUSED_TILE_BYTES), and each step does all its work on a tile
# while the tile is in cache -- the product and its min/max, the mask and the stats over visible keys,
# softmax with its row sums, winners and pooled overview -- instead of one pass over the whole
# (heads × seq × seq) array per reduction.  Key columns that the mask blocks for every row of a band
# (above a causal diagonal) are filled, not computed: softmax gives them weight 0 and weights·V skips
# them.  Bands run on FUSED_WORKERS threads (numpy and BLAS release the GIL; BLAS gets one thread
# per tile meanwhile).  Each step still hands the whole array to the hooks, the checks and the
# trace, and a step that is overridden (an injected bug) or hooked takes none of these short cuts.

FUSED_MIN_ELEMENTS = 1 << 22     # score arrays smaller than this run the plain steps
FUSED_TILE_BYTES = 1 << 20       # one head's band of scores: about L2-sized
PRODUCT_TILE_BYTES = 1 << 21     # a band of the products Q·Kᵀ and weights·V (taller: BLAS likes them so)
FUSED_WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else (os.cpu_count() or 1)))
_EXECUTOR = None
_BLAS_CONTROLLER = None


class Bands:
    """Query-row bands of a score array, each inside one cell of the pooled overview's grid, and for
    each band (per mask batch item) the key columns every row sees (< lo) and that no row sees (>= hi)."""

    def __init__(self, seq_q: int, seq_k: int, itemsize: int, keep: Optional[np.ndarray]):
        self.seq_q, self.seq_k = seq_q, seq_k
        self.cells = grid_edges(seq_q, POOL_CELLS)
        rows = max(1, FUSED_TILE_BYTES // max(1, seq_k * itemsize))
        edges, cell_of = [], []
        for c in range(len(self.cells) - 1):
            start, stop = int(self.cells[c]), int(self.cells[c + 1])
            pieces = -(-(stop - start) // rows)
            cut = np.linspace(start, stop, pieces + 1).round().astype(np.int64)
            edges.extend(int(e) for e in cut[:-1])
            cell_of.extend([c] * pieces)
        edges.append(seq_q)
        self.edges = np.asarray(edges, dtype=np.int64)
        self.cell_of = np.asarray(cell_of, dtype=np.int64)
        n = len(self.edges) - 1
        self.past_last = None
        if keep is None:
            self.lo = self.hi = np.full((1, n), seq_k, dtype=np.int64)
            return
        # per row: the first blocked key and one past the last visible one; a band's columns below the
        # smallest first-blocked are seen by every row, those from the largest one-past-last by none
        rows_keep = keep[:, 0]                                        # (batch or 1, seq_q, seq_k)
        first_blocked = np.where(rows_keep.all(axis=-1), seq_k, np.argmin(rows_keep, axis=-1))
        past_last = np.where(rows_keep.any(axis=-1), seq_k - np.argmax(rows_keep[..., ::-1], axis=-1), 0)
        self.lo = np.minimum.reduceat(first_blocked, self.edges[:-1], axis=-1).astype(np.int64)
        self.hi = np.maximum.reduceat(past_last, self.edges[:-1], axis=-1).astype(np.int64)
        self.past_last = past_last

    def product_tasks(self, batch: int, itemsize: int):
        """(batch item, first row, row after the last, keys seen) bands for the products."""
        rows = max(1, PRODUCT_TILE_BYTES // max(1, self.seq_k * itemsize))
        tasks = []
        for b in range(batch):
            for r0 in range(0, self.seq_q, rows):
                r1 = min(r0 + rows, self.seq_q)
                hi = self.seq_k if self.past_last is None else \
                    int(self.past_last[min(b, self.past_last.shape[0] - 1), r0:r1].max())
                tasks.append((b, r0, r1, hi))
        return tasks

    def tasks(self, batch: int):
        """(batch item, grid cell, [band indices]) work units: one cell of the overview each."""
        by_cell: Dict[int, list] = {}
        for i, c in enumerate(self.cell_of):
            by_cell.setdefault(int(c), []).append(i)
        return [(b, c, bands) for b in range(batch) for c, bands in by_cell.items()]

    def span(self, b: int, i: int):
        m = min(b, self.lo.shape[0] - 1)
        return int(self.edges[i]), int(self.edges[i + 1]), int(self.lo[m, i]), int(self.hi[m, i])


def _head_groups(heads: int, rows: int, width: int, itemsize: int):
    """Ranges of heads whose band (rows × width each) together make about one tile: short rows go
    several heads at a time, so that numpy's per-call cost does not swamp small tiles."""
    g = max(1, min(heads, FUSED_TILE_BYTES // max(1, rows * width * itemsize)))
    return [(start, min(start + g, heads)) for start in range(0, heads, g)]


def _least(values) -> float:
    """The smallest of the tiles' minima, NaN if any tile saw one (Python's min would drop it)."""
    return float(np.min(np.fromiter(values, dtype=np.float64)))


def _most(values) -> float:
    return float(np.max(np.fromiter(values, dtype=np.float64)))


def _fused(state: State, shape) -> bool:
    return int(np.prod(shape)) >= FUSED_MIN_ELEMENTS


def _bands(state: State) -> Bands:
    """The bands of this block (computed once per block, with its mask)."""
    keep = state.values.get("mask")
    cached = state.bands
    if cached is not None and cached[0] is keep:
        return cached[1]
    plan = state.plan
    bands = Bands(plan.size("seq_q"), plan.size("seq_k"), state.dtype.itemsize, keep)
    state.bands = (keep, bands)
    return bands


def _map(function, tasks, blas: bool = False) -> list:
    """function over tasks on FUSED_WORKERS threads (numpy's errstate carried over), BLAS on one
    thread per task meanwhile when `blas` (a band's products are too small to share)."""
    global _EXECUTOR, _BLAS_CONTROLLER
    limit = contextlib.nullcontext()
    if blas and len(tasks) > 1:
        try:
            if _BLAS_CONTROLLER is None:
                from threadpoolctl import ThreadpoolController
                _BLAS_CONTROLLER = ThreadpoolController()
            limit = _BLAS_CONTROLLER.limit(limits=1, user_api="blas")
        except ImportError:           # without threadpoolctl: one band at a time, BLAS threads as they are
            return [function(task) for task in tasks]
    if FUSED_WORKERS < 2 or len(tasks) < 2:
        with limit:
            return [function(task) for task in tasks]
    if _EXECUTOR is None:
        from concurrent.futures import ThreadPoolExecutor
        _EXECUTOR = ThreadPoolExecutor(FUSED_WORKERS, thread_name_prefix="attntrace-band")
    settings = np.geterr()

    def run(task):
        with np.errstate(**settings):
            return function(task)
    with limit:
        return list(_EXECUTOR.map(run, tasks))


def fused_qk(state: State, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Q·Kᵀ tile by tile into one buffer, each tile's min and max taken while it is in cache; the
    sum of all scores is Σ_i q_i · Σ_j k_j (per batch item and head), no pass at all."""
    b, sq, h, d = q.shape
    sk, kv = k.shape[1], k.shape[2]
    group = h // kv
    out = SCORE_BUFFER.empty((b, h, sq, sk), np.result_type(q, k))     # every value is written below
    bands = _bands(state)
    q = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)     # each head's rows together
    k = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)

    def tile(task):
        item, r0, r1, _ = task
        lo, hi = np.inf, -np.inf
        for head in range(h):
            block = out[item, head, r0:r1]
            np.matmul(q[item, r0:r1, head], k[item, :, head // group].T, out=block)
            lo, hi = np.minimum(lo, block.min()), np.maximum(hi, block.max())
        return lo, hi
    parts = _map(tile, bands.product_tasks(b, out.itemsize), blas=True)
    q_sum = q.sum(axis=1, dtype=np.float64)                              # (b, h, d)
    k_sum = np.repeat(k.sum(axis=1, dtype=np.float64), group, axis=1)    # (b, h, d): each query head's kv head
    total = float(np.einsum("bhd,bhd->", q_sum, k_sum))
    stats = stats_from_parts(out.shape, out.dtype, _least(p[0] for p in parts), _most(p[1] for p in parts),
                             total, out.size)
    if stats is not None:
        state.fused["qk"] = {"stats": stats}
    return out


def fused_scale(state: State, scores: np.ndarray, factor) -> np.ndarray:
    b = scores.shape[0]
    bands = _bands(state)

    def tile(task):
        item, _, indices = task
        r0, r1 = int(bands.edges[indices[0]]), int(bands.edges[indices[-1] + 1])
        block = scores[item, :, r0:r1]
        np.multiply(block, factor, out=block)
    _map(tile, bands.tasks(b))
    return scores


def fused_mask(state: State, scores: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """-inf where the mask blocks, and the min, max and sum over the visible scores, band by band:
    columns every row of a band sees are only read, columns none sees are only written."""
    b, h = scores.shape[:2]
    bands = _bands(state)
    minus_inf = scores.dtype.type(-np.inf)
    row_max = np.empty(scores.shape[:3], dtype=scores.dtype)       # softmax's first step, taken here

    def tile(task):
        item, _, indices = task
        lo_v, hi_v, total = np.inf, -np.inf, 0.0
        m = min(item, keep.shape[0] - 1)
        for i in indices:
            r0, r1, lo, hi = bands.span(item, i)
            visible = keep[m, 0, r0:r1, lo:hi]
            blocked = ~visible
            for h0, h1 in _head_groups(h, r1 - r0, hi, scores.itemsize):
                block = scores[item, h0:h1, r0:r1]                    # (heads, rows, seq_k)
                block[..., hi:] = minus_inf
                top = row_max[item, h0:h1, r0:r1]
                top[...] = minus_inf
                if lo > 0:
                    seen = block[..., :lo]
                    lo_v = np.minimum(lo_v, seen.min())
                    seen.max(axis=-1, out=top)
                    total += float(seen.sum(axis=-1).sum(dtype=np.float64))
                if hi > lo:
                    mixed = block[..., lo:hi]
                    np.copyto(mixed, minus_inf, where=blocked)
                    lo_v = np.minimum(lo_v, np.min(mixed, where=visible, initial=np.inf))
                    np.maximum(top, mixed.max(axis=-1), out=top)
                    total += float(np.sum(mixed, where=visible, dtype=np.float64))
                hi_v = np.maximum(hi_v, top.max())
        return lo_v, hi_v, total
    parts = _map(tile, bands.tasks(b))
    count = int(np.broadcast_to(keep, (b, 1) + keep.shape[2:]).sum()) * h
    stats = stats_from_parts(scores.shape, scores.dtype, _least(p[0] for p in parts), _most(p[1] for p in parts),
                             sum(p[2] for p in parts), count, scores.size - count)
    if stats is not None:
        state.fused["attn_scores"] = {"stats": stats}
    state.layouts["attn_scores"] = (scores, bands, row_max)
    return scores


def fused_softmax(state: State, scores: np.ndarray, bands: Bands, pool_it: bool,
                  row_max: Optional[np.ndarray] = None) -> np.ndarray:
    """Softmax in place tile by tile (blocked columns of a band set to 0, not computed), with the
    weights' stats, row sums, row winners and pooled overview taken from each tile in cache."""
    b, h, sq, sk = scores.shape
    row_sums = np.empty((b, h, sq), dtype=np.float64)
    top = np.empty((b, h, sq), dtype=np.int64)
    cells = bands.cells
    col_edges = grid_edges(sk, POOL_CELLS)
    if pool_it:
        block_max = np.zeros((b, h, len(cells) - 1, len(col_edges) - 1), dtype=scores.dtype)
        block_sum = np.zeros(block_max.shape, dtype=np.float64)

    def tile(task):
        item, cell, indices = task
        lo_v, total = np.inf, 0.0
        spans = [bands.span(item, i) for i in indices]
        tallest = max(r1 - r0 for r0, r1, _, _ in spans)
        for h0, h1 in _head_groups(h, tallest, max(hi for *_, hi in spans), scores.itemsize):
            if pool_it:
                col_max = np.zeros((h1 - h0, sk), dtype=scores.dtype)
                col_sum = np.zeros((h1 - h0, sk), dtype=scores.dtype)
            for r0, r1, lo, hi in spans:
                block = scores[item, h0:h1, r0:r1]                    # (heads, rows, seq_k)
                if hi == 0:
                    block[...] = 0
                    row_sums[item, h0:h1, r0:r1] = 0.0
                    top[item, h0:h1, r0:r1] = 0
                    lo_v = np.minimum(lo_v, 0.0)
                    continue
                live = ops.softmax_prefix(block, hi, None if row_max is None else row_max[item, h0:h1, r0:r1, None])
                sums = live.sum(axis=-1)
                row_sums[item, h0:h1, r0:r1] = sums
                top[item, h0:h1, r0:r1] = live.argmax(axis=-1)
                # a blocked key in the band has weight 0, the least a weight can be (NaN shows in the sums)
                lo_v = np.minimum(lo_v, 0.0 if lo < sk else live.min())
                total += float(sums.sum(dtype=np.float64))
                if pool_it:
                    np.maximum(col_max[:, :hi], live.max(axis=-2), out=col_max[:, :hi])
                    col_sum[:, :hi] += live.sum(axis=-2)
            if pool_it:
                block_max[item, h0:h1, cell] = np.maximum.reduceat(col_max, col_edges[:-1], axis=-1)
                block_sum[item, h0:h1, cell] = np.add.reduceat(col_sum.astype(np.float64), col_edges[:-1], axis=-1)
        return lo_v, total
    parts = _map(tile, bands.tasks(b))
    winners = np.take_along_axis(scores, top[..., None], axis=-1)[..., 0]
    stats = stats_from_parts(scores.shape, scores.dtype, _least(p[0] for p in parts), float(winners.max()),
                             sum(p[1] for p in parts), scores.size)
    if stats is not None:                 # no NaN or inf anywhere: what the tiles saw is the whole story
        extras = {"stats": stats, "row_sums": row_sums, "winners": (winners, top)}
        if pool_it:
            sizes = np.diff(cells)[:, None] * np.diff(col_edges)[None, :]
            extras["pooled"] = Pooled(block_max, block_sum / sizes, cells, col_edges)
        state.fused["pattern"] = extras
    state.layouts["pattern"] = (scores, bands)
    return scores


def fused_mix(state: State, pattern: np.ndarray, v: np.ndarray, bands: Bands) -> np.ndarray:
    """weights·V band by band over the keys a band can see (the others have weight 0 exactly)."""
    b, h, sq, sk = pattern.shape
    kv, dv = v.shape[2], v.shape[3]
    group = h // kv
    z = np.empty((b, h, sq, dv), dtype=np.result_type(pattern, v))

    def tile(task):
        item, r0, r1, hi = task
        for head in range(h):
            np.matmul(pattern[item, head, r0:r1, :hi], v[item, :hi, head // group], out=z[item, head, r0:r1])
    _map(tile, bands.product_tasks(b, pattern.itemsize), blas=True)
    return z.transpose(0, 2, 1, 3)


# --------------------------------------------------------------------------- chunked attention

def step_block_max(state: State) -> np.ndarray:
    """Online softmax over key blocks: z and the traced row's running state in one pass; then the
    weights' stats block by block (their pooled overview, row sums, winners), never the weights."""
    from attntrace.core import chunked  # here: a run without `chunk` does not load it
    plan, block = state.plan, state.block
    q, k = rotated_q_k(state)
    b, sq, sk, h = plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"), plan.size("n_heads")
    bias = chunked.alibi_bias(sq, sk, positional.alibi_slopes(h)) if plan.positional == "alibi" else None
    result = chunked.chunked_attention(
        q, k, state["v"], scale=block.scale, keep=chunked.mask_provider(state.attention.mask, b, sq, sk),
        bias=bias, q_block=block.chunk, k_block=block.chunk, trace_rows=block.chunk_row, stats=True,
        grid=POOL_CELLS)
    state.chunked = result
    return result.trace.running_max


def step_block_sum(state: State) -> np.ndarray:
    return state.chunked.trace.running_sum


def step_block_out(state: State) -> np.ndarray:
    return state.chunked.trace.partial_out


def step_chunked_z(state: State) -> np.ndarray:
    return state.chunked.z


def chunked_summary(trace: Trace, step: Step, result) -> None:
    """What a trace knows of weights it never held: their stats, pooled overview, row sums and winners,
    filed under the pattern hook of the step's block."""
    stats = result.stats
    hook = full_name("attn.hook_pattern", step.layer if trace.plan.named_blocks else None)
    shape = (trace.plan.size("batch"), trace.plan.size("n_heads"), trace.plan.size("seq_q"), trace.plan.size("seq_k"))
    trace.stats[hook] = Stats(shape, str(result.z.dtype), float(stats.min), float(stats.max), float(stats.mean))
    trace.pooled[hook] = Pooled(stats.pooled_max, stats.pooled_mean, stats.row_edges, stats.col_edges)
    trace.row_sums[hook] = np.asarray(stats.row_sums, dtype=np.float64)
    trace.winners[hook] = (stats.row_max, stats.row_argmax)


# --------------------------------------------------------------------------- block steps

def step_resid_pre(state: State) -> np.ndarray:
    return state.stream()


def step_ln1(state: State) -> np.ndarray:
    source = state["resid_pre"] if state.block.placement == "pre" else state["resid_mid"]
    return _norm(state, state.block_spec.ln1, source)


def step_resid_mid(state: State) -> np.ndarray:
    return state["resid_pre"] + state["out"]


def step_ln2(state: State) -> np.ndarray:
    source = state["resid_mid"] if state.block.placement == "pre" else state["resid_post"]
    return _norm(state, state.block_spec.ln2, source)


def _mlp_input(state: State) -> np.ndarray:
    if state.block.placement == "pre":
        return state["ln2"] if "ln2" in state.values else state["resid_mid"]
    return state["ln1"] if "ln1" in state.values else state["resid_mid"]


def _mlp_weight(state: State, name: str):
    mlp = state.block_spec.mlp
    return state.optional(mlp.get(name)), mlp.layout


def step_mlp_pre(state: State) -> np.ndarray:
    first = "W_gate" if state.block_spec.mlp.gated else "W_in"
    weight, layout = _mlp_weight(state, first)
    bias, _ = _mlp_weight(state, "b_gate" if first == "W_gate" else "b_in")
    return ops.linear(_mlp_input(state), weight, bias, layout)


def step_mlp_post(state: State) -> np.ndarray:
    mlp = state.block_spec.mlp
    activated = ops.ACTIVATIONS[mlp.activation](state["mlp_pre"])
    if not mlp.gated:
        return activated
    weight, layout = _mlp_weight(state, "W_up")
    bias, _ = _mlp_weight(state, "b_up")
    activated *= ops.linear(_mlp_input(state), weight, bias, layout)
    return activated


def step_mlp_out(state: State) -> np.ndarray:
    gated = state.block_spec.mlp.gated
    weight, layout = _mlp_weight(state, "W_down" if gated else "W_out")
    bias, _ = _mlp_weight(state, "b_down" if gated else "b_out")
    return ops.linear(state["mlp_post"], weight, bias, layout)


def step_resid_post(state: State) -> np.ndarray:
    base = state["ln1"] if state.block.placement == "post" and "ln1" in state.values else state["resid_mid"]
    return base + state["mlp_out"]


StepFn = Callable[[State], np.ndarray]
STEP_FUNCTIONS: Dict[str, StepFn] = {
    "embed": step_embed, "pos": step_pos, "embed_norm": step_embed_norm, "encoder_embed": step_encoder_embed,
    "resid_pre": step_resid_pre, "ln1": step_ln1,
    "q": step_q, "k": step_k, "v": step_v, "rot_q": step_rot_q, "rot_k": step_rot_k,
    "qk": step_qk, "scaled": step_scaled, "mask": step_mask, "attn_scores": step_attn_scores,
    "pattern": step_pattern, "z": step_z, "z_concat": step_z_concat, "out": step_out,
    "block_max": step_block_max, "block_sum": step_block_sum, "block_out": step_block_out,
    "resid_mid": step_resid_mid, "ln2": step_ln2, "mlp_pre": step_mlp_pre, "mlp_post": step_mlp_post,
    "mlp_out": step_mlp_out, "resid_post": step_resid_post, "ln_final": step_ln_final,
}


# --------------------------------------------------------------------------- execution

Keep = Union[str, Iterable[str], None]
AfterStep = Callable[[Step, np.ndarray, State, Trace], None]


def keep_set(keep: Keep, plan: Plan) -> Optional[Set[str]]:
    """None means 'auto' (small arrays); otherwise the hook names to keep."""
    if keep is None or keep == "auto":
        return None
    if keep == "all":
        return set(plan.hooks)
    names: Set[str] = set()
    for pattern in ([keep] if isinstance(keep, str) else keep):
        names.update(match_hooks(pattern, plan.hooks))
    return names


def execute(spec: Spec, plan: Plan, *, hookset: HookSet, keep: Keep = "auto", dtype: str = "float64",
            overrides: Optional[Dict[str, StepFn]] = None, after_step: Optional[AfterStep] = None,
            trace: Optional[Trace] = None) -> Trace:
    """Run every step of `plan` on `spec` and return the Trace.

    hookset: the run's hooks (fired after each step, before anything reads the array).
    keep: "auto" (arrays up to 1M values), "all", or hook names/patterns to keep.
    overrides: step key -> replacement function (how bugs are injected), in every block.
    after_step(step, array, state, trace): called after each step with the live array,
    before an in-place step may reuse its buffer (checks, the stepper).
    """
    with _blas_threads(plan):
        return _execute(spec, plan, hookset, keep, dtype, overrides, after_step, trace)


def _blas_threads(plan: Plan):
    """One BLAS thread for small runs (see ONE_THREAD_FLOPS); threadpoolctl, when installed, sets it
    (not needed for toy runs: see BLAS_SINGLE_THREADED_FLOPS)."""
    largest = max((plan.flops(step) for step in plan.steps), default=0)
    if largest >= ONE_THREAD_FLOPS or largest < BLAS_SINGLE_THREADED_FLOPS:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:          # an optional speed-up: without it the run is the same, only slower
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _execute(spec, plan, hookset, keep, dtype, overrides, after_step, trace) -> Trace:
    np_dtype = np.dtype(dtype)
    state = State(spec, plan, np_dtype)
    wanted = keep_set(keep, plan)
    trace = trace if trace is not None else Trace(spec=spec, plan=plan, dtype=np_dtype.name)
    functions = dict(STEP_FUNCTIONS, **(overrides or {}))
    block_outputs = {id(steps[-1]) for steps in _steps_by_layer(plan).values()}
    with np.errstate(all="ignore"):     # overflow and NaN are reported by the checks (ATT-W204), not warned
        _execute_steps(plan, state, trace, functions, hookset, wanted, overrides, after_step, block_outputs)
    return trace


def _execute_steps(plan: Plan, state: State, trace: Trace, functions: Dict[str, StepFn], hookset: HookSet,
                   wanted: Optional[Set[str]], overrides: Optional[Dict[str, StepFn]],
                   after_step: Optional[AfterStep], block_outputs: Set[int]) -> None:
    for step in plan.steps:
        if step.layer is not None and step.layer != state.layer:
            state.enter(step.layer)
        function = step_chunked_z if step.key == "z" and state.block.chunk else functions[step.key]
        hooked = step.hook in hookset.hooked
        standard = step.key not in (overrides or {}) and not hooked
        state.fused.clear()
        state.pool_wanted = not hooked and (wanted is None or step.hook not in wanted)
        array = function(state)
        if step.key == "block_max":
            chunked_summary(trace, step, state.chunked)
        array = hookset.fire(step.hook, array)
        # what a step's tiles found holds for its own, unhooked result only
        extras = state.fused.pop(step.key, None) if standard else None
        if not standard:
            state.layouts.pop(step.key, None)
        state.store(step, array)
        if standard:
            trace.engine_computed.add(step.hook)
        keep_it = hooked or step is plan.steps[-1] or (     # the output is always kept: trace["output"]
            array.size <= AUTO_KEEP_ELEMENTS if wanted is None else step.hook in wanted)
        if keep_it:
            state.protect(step)
            trace.arrays[step.hook] = array
        else:
            point = point_of(step.hook)
            trace.previews[step.hook] = preview(array, point.rows, point.cols, PREVIEW_EDGE)
            if step.key == "pattern" and array.shape[-1] > POOL_CELLS:
                # what a long sequence's overview draws
                trace.pooled[step.hook] = extras["pooled"] if extras and "pooled" in extras else pool(array)
        trace.stats[step.hook] = extras["stats"] if extras else _step_stats(step, array, state, trace, standard)
        if step.key == "pattern":
            if extras:
                trace.winners[step.hook], trace.row_sums[step.hook] = extras["winners"], extras["row_sums"]
            else:
                trace.winners[step.hook] = row_winners(array)
                trace.row_sums[step.hook] = array.sum(axis=-1, dtype=np.float64)
        if after_step is not None:
            after_step(step, array, state, trace)
        if id(step) in block_outputs:       # the next block (or the final norm) reads it
            state.block_output = array
        _release(state, step.key)


def _steps_by_layer(plan: Plan) -> Dict[int, list]:
    by_layer: Dict[int, list] = {}
    for step in plan.steps:
        if step.layer is not None:
            by_layer.setdefault(step.layer, []).append(step)
    return by_layer


def _step_stats(step: Step, array: np.ndarray, state: State, trace: Trace, standard: bool):
    """Stats of a step's result, skipping passes over score-sized arrays where the
    engine knows the answer: the standard scale step multiplies by a positive
    factor, and masked scores hold -inf exactly where the mask blocks."""
    if step.key == "scaled" and standard and state.plan.positional != "alibi" and state.block.scale > 0:
        return scaled_stats(trace.stats[state.plan.step("qk", step.layer).hook], state.block.scale)
    if step.key == "attn_scores" and standard and "mask" not in state:
        return trace.stats[state.plan.step("scaled", step.layer).hook]      # no mask: the scaled values
    if step.key == "attn_scores" and "mask" in state:
        return array_stats(array, valid=state["mask"], trusted=standard)
    return array_stats(array)


# Arrays no later step reads can go as soon as their step is done (unless kept).
_LAST_READER = {"qk": "scaled", "scaled": "attn_scores", "attn_scores": "pattern"}


def _release(state: State, finished: str) -> None:
    for key, last in _LAST_READER.items():
        if last == finished and key in state.values and key not in state.protected:
            # the checks of the finished step have run; the buffer was reused in place
            del state.values[key]
