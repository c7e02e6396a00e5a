"""config.json → :class:`ModelConfig`: the facts a forward pass needs, for the supported families.

Supported ``model_type`` values and what each implies:

==========  ========  =========  ====================  ==============  ===============================
model_type  family    norm       placement / position  MLP             attention
==========  ========  =========  ====================  ==============  ===============================
bert        bert      LayerNorm  post / learned+types  W_in,W_out      bidirectional, q/k/v/o biases
gpt2        gpt2      LayerNorm  pre / learned         W_in,W_out      causal, q/k/v/o biases
llama       llama     RMSNorm    pre / RoPE            gated (SwiGLU)  causal, GQA, ``attention_bias``
mistral     llama     RMSNorm    pre / RoPE            gated (SwiGLU)  causal, GQA, sliding window
qwen2       llama     RMSNorm    pre / RoPE            gated (SwiGLU)  causal, GQA, q/k/v biases, window
==========  ========  =========  ====================  ==============  ===============================

Sliding windows follow transformers (verified against it in the tests): a query at position
``i`` with window ``w`` keeps keys ``j`` with ``i - w < j <= i`` -- ``w`` keys, itself included.
Mistral applies ``sliding_window`` (``null`` = none) to every layer; Qwen2 only when
``use_sliding_window`` is true and only on the layers ``layer_types`` marks
``sliding_attention`` (by default layers ``>= max_window_layers``).

RoPE pairs dimension ``k`` with ``k + d_head/2`` (transformers' ``rotate_half``), with
frequencies ``rope_theta ** (-2k / d_head)``; only the unscaled ("default") rope type is
implemented.  Everything else is refused by name.

Codes: ATT-E320 config.json unreadable, ATT-E321 model_type not supported, ATT-E322 a
required field missing, ATT-E323 a field's value is wrong or inconsistent, ATT-E324 a
feature of a supported family that attntrace does not implement.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from attntrace.errors import Diagnosis, InputError

SUPPORTED_MODEL_TYPES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}

# hidden_act / activation_function values -> our activation names
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}

# transformers' defaults for keys a config.json may leave out
MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
MISTRAL_WINDOW_DEFAULT = 4096
QWEN2_WINDOW_DEFAULT, QWEN2_MAX_WINDOW_LAYERS_DEFAULT = 4096, 28


@dataclass(frozen=True)
class ModelConfig:
    """What a forward pass needs to know, in one vocabulary for every family.

    Weight shapes (see :mod:`attntrace.models.families`): W_q is (n_heads·d_head, d_model),
    W_k and W_v are (n_kv_heads·d_head, d_model), W_o is (d_model, n_heads·d_head).
    """

    family: str                     # "bert" | "gpt2" | "llama"
    model_type: str                 # as config.json says: bert, gpt2, llama, mistral, qwen2
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    activation: str                 # gelu | gelu_tanh | relu | silu
    mlp_gated: bool                 # True: W_down(act(W_gate x) * (W_up x)); False: W_out(act(W_in x))
    norm: str                       # layernorm | rmsnorm
    norm_eps: float
    placement: str                  # pre: x + f(norm(x)) ; post: norm(x + f(x))
    positional: str                 # learned | rope
    causal: bool
    max_positions: int
    attn_bias: Dict[str, bool]      # {"q","k","v","o"} -> has a bias
    mlp_bias: bool
    embed_norm: bool                # a norm right after the embeddings (BERT)
    final_norm: bool                # a norm after the last block (GPT-2, Llama)
    tie_word_embeddings: bool
    type_vocab_size: int = 0        # token-type (segment) embeddings; 0 = none
    rope_theta: Optional[float] = None
    sliding_window: Optional[int] = None
    sliding_layers: Tuple[bool, ...] = ()     # per layer: does the window apply there
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, Tuple[int, ...], None] = None
    architectures: Tuple[str, ...] = ()
    stored_dtype: Optional[str] = None        # what config.json claims ("torch_dtype"/"dtype"), informational
    source: Optional[Path] = None
    keys: Dict[str, str] = field(default_factory=dict)   # our field -> the config.json key it came from

    @property
    def attn_scale(self) -> float:
        """The score scale: 1/sqrt(d_head) for every supported family."""
        return self.d_head ** -0.5

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of ``layer`` (keys i-w < j <= i), or None for full (causal) attention."""
        if self.sliding_window is None or not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def key(self, name: str) -> str:
        """The config.json key behind one of our fields, for messages."""
        return self.keys.get(name, name)


class _Reader:
    """Typed access to one config.json, with errors naming the key and the file."""

    def __init__(self, raw: Dict[str, Any], path: Path):
        self.raw, self.path, self.keys = raw, path, {}

    def fail(self, code: str, message: str, hint: Optional[str] = None) -> InputError:
        return InputError(Diagnosis(code=code, message=message, details=[f"file: {self.path}"], hint=hint))

    def get(self, ours: str, *names: str, default: Any = None, required: bool = False) -> Any:
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                self.keys[ours] = name
                return self.raw[name]
        self.keys[ours] = names[0]
        if required:
            raise self.fail("ATT-E322", f"{self.path.name} has no {' / '.join(repr(n) for n in names)} "
                            f"(needed for {ours})")
        return default

    def integer(self, ours: str, *names: str, default: Any = None, required: bool = True,
                minimum: int = 1) -> Optional[int]:
        value = self.get(ours, *names, default=default, required=required and default is None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail("ATT-E323", f"{self.path.name}: {self.keys[ours]} is {value!r}, expected an "
                            f"integer >= {minimum}")
        return value

    def number(self, ours: str, *names: str, default: float) -> float:
        return self.positive(self.get(ours, *names, default=default), ours)

    def positive(self, value: Any, ours: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.fail("ATT-E323", f"{self.path.name}: {self.keys[ours]} is {value!r}, expected a "
                            "positive number")
        return float(value)

    def flag(self, ours: str, name: str, default: bool) -> bool:
        value = self.get(ours, name, default=default)
        if not isinstance(value, bool):
            raise self.fail("ATT-E323", f"{self.path.name}: {name} is {value!r}, expected true or false")
        return value

    def token_id(self, ours: str, name: str) -> Union[int, Tuple[int, ...], None]:
        value = self.get(ours, name)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return tuple(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail("ATT-E323", f"{self.path.name}: {name} is {value!r}, expected a token id")
        return value

    def activation(self, *names: str, default: str) -> str:
        value = self.get("activation", *names, default=default)
        if value not in ACTIVATIONS:
            raise self.fail("ATT-E324", f"{self.path.name}: {self.keys['activation']} {value!r} is not "
                            "implemented", hint="implemented: " + ", ".join(sorted(ACTIVATIONS)))
        return ACTIVATIONS[value]

    def refuse(self, name: str, allowed, why: str) -> None:
        """ATT-E324 when ``name`` is present with a value outside ``allowed``."""
        if name in self.raw and self.raw[name] not in allowed:
            raise self.fail("ATT-E324", f"{self.path.name}: {name} = {self.raw[name]!r} is not implemented "
                            f"({why})", hint=f"supported: {name} in {list(allowed)}")


def load_config(path: Union[str, Path]) -> ModelConfig:
    """Read and validate a config.json (ATT-E320..E324 on anything unusable)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(Diagnosis(code="ATT-E320", message=f"cannot read {path}: {exc.strerror or exc}")) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(Diagnosis(code="ATT-E320", message=f"{path.name} is not valid JSON: {exc}",
                                   details=[f"file: {path}"])) from None
    if not isinstance(raw, dict):
        raise InputError(Diagnosis(code="ATT-E320", message=f"{path.name} holds a JSON {type(raw).__name__}, "
                                   "not an object", details=[f"file: {path}"]))
    return config_from_dict(raw, path)


def config_from_dict(raw: Dict[str, Any], path: Union[str, Path] = "config.json") -> ModelConfig:
    """A :class:`ModelConfig` from config.json's parsed contents (``path`` only names it in messages)."""
    reader = _Reader(raw, Path(path))
    model_type = reader.get("model_type", "model_type")
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type is None:
        raise reader.fail("ATT-E322", f"{reader.path.name} has no model_type", hint=f"supported: {supported}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise reader.fail("ATT-E321", f"model_type {model_type!r} is not supported", hint=f"supported: {supported}")
    builder = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}[SUPPORTED_MODEL_TYPES[model_type]]
    facts = builder(reader, model_type)
    architectures = raw.get("architectures") or ()
    return ModelConfig(
        model_type=model_type, **facts,
        pad_token_id=reader.token_id("pad_token_id", "pad_token_id"),
        bos_token_id=reader.token_id("bos_token_id", "bos_token_id"),
        eos_token_id=reader.token_id("eos_token_id", "eos_token_id"),
        architectures=tuple(a for a in architectures if isinstance(a, str)),
        stored_dtype=raw.get("torch_dtype") or raw.get("dtype"), source=reader.path, keys=dict(reader.keys))


def _heads(reader: _Reader, d_model: int, n_heads: int, n_kv_heads: int, d_head: Optional[int]) -> int:
    """d_head (given, or d_model / n_heads) after checking the head counts fit together."""
    if n_heads % n_kv_heads:
        raise reader.fail("ATT-E323", f"{reader.path.name}: {reader.keys['n_heads']} {n_heads} is not a multiple "
                          f"of {reader.keys['n_kv_heads']} {n_kv_heads}",
                          hint="grouped-query attention shares each key/value head among n_heads / n_kv_heads heads")
    if d_head is not None:
        return d_head
    if d_model % n_heads:
        raise reader.fail("ATT-E323", f"{reader.path.name}: {reader.keys['d_model']} {d_model} is not divisible "
                          f"by {reader.keys['n_heads']} {n_heads} ({d_model} = {n_heads}×{d_model // n_heads} + "
                          f"{d_model % n_heads})", hint="give head_dim explicitly, or fix the head count")
    return d_model // n_heads


def _bert(reader: _Reader, model_type: str) -> Dict[str, Any]:
    reader.refuse("position_embedding_type", ["absolute"], "only absolute learned positions")
    reader.refuse("is_decoder", [False], "BERT as a causal decoder")
    reader.refuse("add_cross_attention", [False], "cross-attention")
    d_model = reader.integer("d_model", "hidden_size")
    n_heads = reader.integer("n_heads", "num_attention_heads")
    reader.keys["n_kv_heads"] = reader.keys["n_heads"]
    n_layers = reader.integer("n_layers", "num_hidden_layers")
    biases = {"q": True, "k": True, "v": True, "o": True}
    return dict(family="bert", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads,
                d_head=_heads(reader, d_model, n_heads, n_heads, None),
                d_mlp=reader.integer("d_mlp", "intermediate_size"),
                vocab_size=reader.integer("vocab_size", "vocab_size"),
                activation=reader.activation("hidden_act", default="gelu"), mlp_gated=False,
                norm="layernorm", norm_eps=reader.number("norm_eps", "layer_norm_eps", default=1e-12),
                placement="post", positional="learned", causal=False,
                max_positions=reader.integer("max_positions", "max_position_embeddings", default=512),
                attn_bias=biases, mlp_bias=True, embed_norm=True, final_norm=False,
                tie_word_embeddings=reader.flag("tie_word_embeddings", "tie_word_embeddings", True),
                type_vocab_size=reader.integer("type_vocab_size", "type_vocab_size", default=2, minimum=0),
                sliding_layers=(False,) * n_layers)


def _gpt2(reader: _Reader, model_type: str) -> Dict[str, Any]:
    reader.refuse("scale_attn_weights", [True], "unscaled attention scores")
    reader.refuse("scale_attn_by_inverse_layer_idx", [False], "scores scaled by 1/(layer+1)")
    reader.refuse("add_cross_attention", [False], "cross-attention")
    d_model = reader.integer("d_model", "n_embd", "hidden_size")
    n_heads = reader.integer("n_heads", "n_head", "num_attention_heads")
    reader.keys["n_kv_heads"] = reader.keys["n_heads"]
    d_mlp = reader.integer("d_mlp", "n_inner", default=4 * d_model)
    n_layers = reader.integer("n_layers", "n_layer", "num_hidden_layers")
    return dict(family="gpt2", n_layers=n_layers, sliding_layers=(False,) * n_layers,
                d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads,
                d_head=_heads(reader, d_model, n_heads, n_heads, None), d_mlp=d_mlp,
                vocab_size=reader.integer("vocab_size", "vocab_size"),
                activation=reader.activation("activation_function", default="gelu_new"), mlp_gated=False,
                norm="layernorm", norm_eps=reader.number("norm_eps", "layer_norm_epsilon", default=1e-5),
                placement="pre", positional="learned", causal=True,
                max_positions=reader.integer("max_positions", "n_positions", "n_ctx", default=1024),
                attn_bias={"q": True, "k": True, "v": True, "o": True}, mlp_bias=True,
                embed_norm=False, final_norm=True,
                tie_word_embeddings=reader.flag("tie_word_embeddings", "tie_word_embeddings", True))


def _rope_theta(reader: _Reader) -> float:
    """rope_theta from transformers 5's ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    for key in ("rope_parameters", "rope_scaling"):
        params = reader.raw.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise reader.fail("ATT-E323", f"{reader.path.name}: {key} is {params!r}, expected an object")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise reader.fail("ATT-E324", f"{reader.path.name}: {key} rope_type {rope_type!r} is not implemented",
                              hint="implemented: unscaled RoPE (rope_type 'default')")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise reader.fail("ATT-E324", f"{reader.path.name}: {key}.partial_rotary_factor "
                              f"{params['partial_rotary_factor']} is not implemented (only full rotation)")
        if "rope_theta" in params:
            reader.keys["rope_theta"] = f"{key}.rope_theta"
            return reader.positive(params["rope_theta"], "rope_theta")
    return reader.number("rope_theta", "rope_theta", default=10000.0)


def _window(reader: _Reader, default: int) -> Optional[int]:
    """sliding_window: an absent key takes transformers' default, an explicit null means none."""
    if "sliding_window" in reader.raw and reader.raw["sliding_window"] is None:
        reader.keys["sliding_window"] = "sliding_window"
        return None
    return reader.integer("sliding_window", "sliding_window", default=default)


def _sliding(reader: _Reader, model_type: str, n_layers: int) -> Tuple[Optional[int], Tuple[bool, ...]]:
    """(window, per-layer flags) as transformers applies them for this model_type."""
    if model_type == "llama":
        return None, (False,) * n_layers
    if model_type == "mistral":
        window = _window(reader, MISTRAL_WINDOW_DEFAULT)
        return window, (window is not None,) * n_layers
    if not reader.flag("use_sliding_window", "use_sliding_window", False):
        return None, (False,) * n_layers
    window = _window(reader, QWEN2_WINDOW_DEFAULT)
    if window is None:
        return None, (False,) * n_layers
    layer_types = reader.raw.get("layer_types")
    if layer_types is None:
        first = reader.integer("max_window_layers", "max_window_layers", default=QWEN2_MAX_WINDOW_LAYERS_DEFAULT,
                               minimum=0)
        return window, tuple(i >= first for i in range(n_layers))
    kinds = ("full_attention", "sliding_attention")
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or any(t not in kinds for t in layer_types):
        raise reader.fail("ATT-E323", f"{reader.path.name}: layer_types must list {n_layers} values from {kinds}",
                          hint=f"got {str(layer_types)[:120]}")
    return window, tuple(t == "sliding_attention" for t in layer_types)


def _llama(reader: _Reader, model_type: str) -> Dict[str, Any]:
    d_model = reader.integer("d_model", "hidden_size")
    n_heads = reader.integer("n_heads", "num_attention_heads")
    n_kv_heads = reader.integer("n_kv_heads", "num_key_value_heads", default=n_heads)
    n_layers = reader.integer("n_layers", "num_hidden_layers")
    d_head = _heads(reader, d_model, n_heads, n_kv_heads, reader.integer("d_head", "head_dim", required=False))
    if model_type == "qwen2":
        biases = {"q": True, "k": True, "v": True, "o": False}
    else:
        with_bias = model_type == "llama" and reader.flag("attn_bias", "attention_bias", False)
        biases = dict.fromkeys("qkvo", with_bias)
    window, sliding_layers = _sliding(reader, model_type, n_layers)
    return dict(family="llama", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                d_head=d_head, d_mlp=reader.integer("d_mlp", "intermediate_size"),
                vocab_size=reader.integer("vocab_size", "vocab_size"),
                activation=reader.activation("hidden_act", default="silu"), mlp_gated=True,
                norm="rmsnorm", norm_eps=reader.number("norm_eps", "rms_norm_eps", default=1e-6),
                placement="pre", positional="rope", causal=True, rope_theta=_rope_theta(reader),
                max_positions=reader.integer("max_positions", "max_position_embeddings",
                                             default=MAX_POSITIONS_DEFAULT[model_type]),
                attn_bias=biases,
                mlp_bias=model_type == "llama" and reader.flag("mlp_bias", "mlp_bias", False),
                embed_norm=False, final_norm=True,
                tie_word_embeddings=reader.flag("tie_word_embeddings", "tie_word_embeddings", False),
                sliding_window=window, sliding_layers=sliding_layers)
