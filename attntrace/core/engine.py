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
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Optional, Set, Union

import numpy as np

from attntrace.core import chunked, masks, ops, positional
from attntrace.core.hooks import HookSet
from attntrace.core.memory import AUTO_KEEP_ELEMENTS
from attntrace.core.plan import BlockPlan, Plan, Step
from attntrace.core.stats import (
    POOL_CELLS,
    PREVIEW_EDGE,
    Pooled,
    Stats,
    array_stats,
    pool,
    preview,
    row_winners,
    scaled_stats,
)
from attntrace.core.trace import Trace
from attntrace.errors import Diagnosis, ShapeError
from attntrace.hookpoints import full_name, match_hooks, point_of
from attntrace.inputs.spec import AttentionSpec, BlockSpec, Spec

# Below this many flops in its largest step, a run uses one BLAS thread: waking OpenBLAS's other
# threads for an (8 × 384)·(384 × 1536) product costs more than the product (measured here: 1 ms
# with one thread, 8 ms with two on a busy machine); big products still get every core.
ONE_THREAD_FLOPS = 2e8


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

    # -- the block being run -------------------------------------------------
    def enter(self, layer: int) -> None:
        """Start block `layer`: the previous block's arrays go (kept ones live on in the trace)."""
        self.layer = layer
        self.values = {}
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
    return ops.grouped_scores(*rotated_q_k(state))


def step_scaled(state: State) -> np.ndarray:
    scores = state.take("qk")
    scores *= state.dtype.type(state.block.scale)
    if state.plan.positional == "alibi":      # ALiBi: a per-head linear bias on the scaled scores
        _, h, sq, sk = scores.shape
        scores += state.cast(positional.alibi_bias(h, sq, sk))
    return scores


def step_mask(state: State) -> np.ndarray:
    plan = state.plan
    return masks.build(state.attention.mask, plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"))


def step_attn_scores(state: State) -> np.ndarray:
    scores = state.take("scaled")
    if "mask" in state:
        np.copyto(scores, state.dtype.type(-np.inf), where=~state["mask"])
    return scores


def step_pattern(state: State) -> np.ndarray:
    return ops.softmax(state.take("attn_scores"))


def step_z(state: State) -> np.ndarray:
    return ops.grouped_mix(state["pattern"], state["v"])


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


# --------------------------------------------------------------------------- chunked attention

def step_block_max(state: State) -> np.ndarray:
    """Online softmax over key blocks: z and the traced row's running state in one pass; then the
    weights' stats block by block (their pooled overview, row sums, winners), never the weights."""
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
    """One BLAS thread for small runs (see ONE_THREAD_FLOPS); threadpoolctl, when installed, sets it."""
    if max((plan.flops(step) for step in plan.steps), default=0) >= ONE_THREAD_FLOPS:
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
        array = function(state)
        if step.key == "block_max":
            chunked_summary(trace, step, state.chunked)
        array = hookset.fire(step.hook, array)
        state.store(step, array)
        keep_it = step.hook in hookset.hooked or (
            array.size <= AUTO_KEEP_ELEMENTS if wanted is None else step.hook in wanted)
        if keep_it:
            state.protect(step)
            trace.arrays[step.hook] = array
        else:
            point = point_of(step.hook)
            trace.previews[step.hook] = preview(array, point.rows, point.cols, PREVIEW_EDGE)
            if step.key == "pattern" and array.shape[-1] > POOL_CELLS:
                trace.pooled[step.hook] = pool(array)       # what a long sequence's overview draws
        trace.stats[step.hook] = _step_stats(step, array, state, trace,
                                             standard=step.key not in (overrides or {}) and
                                             step.hook not in hookset.hooked)
        if step.key == "pattern":
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
