"""Per-family name maps: checkpoint tensor names → the neutral :class:`ModelWeights`.

Only this module knows a family's tensor names.  Everything it hands out is in ONE layout,
nn.Linear's ``(out_features, in_features)``: a projection computes ``y = x @ W.T + b``.

======================  ==========================  =====================================
array                   shape                       notes
======================  ==========================  =====================================
embed                   (vocab, d_model)            gather with :meth:`ModelWeights.embed_rows`
pos_embed               (max_positions, d_model)    learned positions (BERT, GPT-2), else None
token_type_embed        (type_vocab, d_model)       BERT segments, else None
embed_norm              Norm                        BERT's LayerNorm after the embeddings
W_q, b_q                (n_heads·d_head, d_model)   head h owns rows h·d_head .. (h+1)·d_head
W_k, W_v, b_k, b_v      (n_kv_heads·d_head, d_model)
W_o, b_o                (d_model, n_heads·d_head)
ln1, ln2                Norm                        see placement below
W_in, b_in              (d_mlp, d_model)            plain MLP: W_out · act(W_in x + b_in) + b_out
W_out, b_out            (d_model, d_mlp)
W_gate, W_up, (biases)  (d_mlp, d_model)            gated: W_down · (act(W_gate x) * (W_up x))
W_down, b_down          (d_model, d_mlp)
final_norm              Norm                        GPT-2 ln_f, Llama norm; None for BERT
unembed                 (vocab, d_model)            lm_head (the embedding itself when tied), or None
======================  ==========================  =====================================

Placement: ``pre`` (GPT-2, Llama) is ``x += attn(ln1(x)); x += mlp(ln2(x))``; ``post``
(BERT) is ``x = ln1(x + attn(x)); x = ln2(x + mlp(x))`` -- BERT's
``attention.output.LayerNorm`` is ln1 and ``output.LayerNorm`` is ln2.

Why one layout: it is the layout of every Linear in a checkpoint, so BERT and Llama
weights are handed out untouched; GPT-2's Conv1D stores ``(in, out)``, so its fused
``c_attn`` is split into Q/K/V along the columns and transposed.  Both are numpy views
(no copy), so one layout costs nothing and the engine needs no per-family switch.

Loading is lazy: :meth:`ModelWeights.layer` reads one layer's tensors the first time
it is asked for (:attr:`ModelWeights.tensors_read` records what was read).  float16 and
bfloat16 checkpoints are computed in float32 by default (``stored_dtypes`` says what
the file holds); float64 on request.

:meth:`ModelWeights.check_consistency` makes silent mistakes loud (codes ATT-E328..E334,
warnings ATT-I300..W302); :func:`load_model` runs it and raises the errors together.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from attntrace.errors import Diagnosis, InputError
from attntrace.inputs.safetensors_io import TARGET_DTYPES, TensorStore, open_tensors
from attntrace.models.checkpoint import CheckpointFiles, find_checkpoint
from attntrace.models.config import ModelConfig, load_config

LAYOUT = "linear"       # (out_features, in_features): y = x @ W.T + b
MAX_LISTED = 8          # names listed in one diagnosis before "... N more"


# --------------------------------------------------------------------------- the neutral form

@dataclass(frozen=True)
class Norm:
    """A LayerNorm ((x - mean) / sqrt(var + eps) * weight + bias) or RMSNorm (x / rms * weight)."""

    kind: str                       # "layernorm" | "rmsnorm"
    weight: np.ndarray              # (d_model,)
    bias: Optional[np.ndarray]      # (d_model,) for LayerNorm; None for RMSNorm
    eps: float


@dataclass(frozen=True)
class LayerWeights:
    """One block's arrays in the linear layout; a field is None where the family has no such array."""

    index: int
    W_q: np.ndarray
    W_k: np.ndarray
    W_v: np.ndarray
    W_o: np.ndarray
    ln1: Norm
    ln2: Norm
    b_q: Optional[np.ndarray] = None
    b_k: Optional[np.ndarray] = None
    b_v: Optional[np.ndarray] = None
    b_o: Optional[np.ndarray] = None
    W_in: Optional[np.ndarray] = None
    b_in: Optional[np.ndarray] = None
    W_out: Optional[np.ndarray] = None
    b_out: Optional[np.ndarray] = None
    W_gate: Optional[np.ndarray] = None
    b_gate: Optional[np.ndarray] = None
    W_up: Optional[np.ndarray] = None
    b_up: Optional[np.ndarray] = None
    W_down: Optional[np.ndarray] = None
    b_down: Optional[np.ndarray] = None


# --------------------------------------------------------------------------- name maps

@dataclass(frozen=True)
class TensorRef:
    """Where one neutral array lives in the checkpoint and what shape config.json implies for it."""

    role: str                       # "W_q", "ln1.weight", "embed", ...
    names: Tuple[str, ...]          # the checkpoint name, then accepted aliases
    axes: Tuple[str, ...]           # symbolic sizes in OUR layout, e.g. ("q_out", "d_model")
    transpose: bool = False         # stored (in, out) like GPT-2's Conv1D
    split: Optional[Tuple[int, int]] = None     # (part, parts) of a fused tensor along its out axis
    layer: Optional[int] = None

    @property
    def bias(self) -> bool:
        return self.role.startswith("b_")


def _linear(role: str, name: str, axes: Tuple[str, str], layer: int, bias: Optional[str]) -> List[TensorRef]:
    refs = [TensorRef(role, (name + ".weight",), axes, layer=layer)]
    if bias:
        refs.append(TensorRef(bias, (name + ".bias",), axes[:1], layer=layer))
    return refs


def _norm(role: str, name: str, layer: Optional[int], with_bias: bool, aliases: bool = False) -> List[TensorRef]:
    # TF-converted BERT checkpoints call LayerNorm's parameters gamma/beta
    refs = [TensorRef(role + ".weight", (name + ".weight",) + ((name + ".gamma",) if aliases else ()),
                      ("d_model",), layer=layer)]
    if with_bias:
        refs.append(TensorRef(role + ".bias", (name + ".bias",) + ((name + ".beta",) if aliases else ()),
                              ("d_model",), layer=layer))
    return refs


class FamilyMap:
    """A family's tensor names.  ``prefix`` is the base-model prefix found in the checkpoint."""

    family = ""
    prefixes: Tuple[str, ...] = ("",)
    embed_name = ""
    lm_head_name: Optional[str] = None      # outside the prefix
    buffers: Tuple[str, ...] = ()           # regexes (after the prefix) of non-parameters: ignored silently
    heads: Dict[str, Tuple[str, str]] = {}  # regex (full name) -> (warning code, note): other heads, not used

    def __init__(self, config: ModelConfig, prefix: str):
        self.config, self.prefix = config, prefix

    def global_refs(self) -> List[TensorRef]:
        raise NotImplementedError

    def layer_refs(self, i: int) -> List[TensorRef]:
        raise NotImplementedError

    def p(self, name: str) -> str:
        return self.prefix + name

    def ignored(self, name: str) -> Optional[Tuple[str, str]]:
        """(code, note) for a tensor no map entry uses but that is known: ("", "") for a buffer."""
        inner = name[len(self.prefix):] if name.startswith(self.prefix) else name
        if any(re.fullmatch(pattern, inner) for pattern in self.buffers):
            return "", ""
        for pattern, note in self.heads.items():
            if re.fullmatch(pattern, name):
                return note
        return None


class BertMap(FamilyMap):
    family = "bert"
    prefixes = ("", "bert.")
    embed_name = "embeddings.word_embeddings.weight"
    buffers = (r"embeddings\.position_ids", r"embeddings\.token_type_ids")
    heads = {r"(bert\.)?pooler\..*": ("ATT-I300", "the pooler (tanh layer on [CLS]) is not part of the encoder "
                                                  "stack; not used"),
             r"cls\..*": ("ATT-I301", "pre-training heads (cls.*: masked-LM / next-sentence) are not used")}

    def global_refs(self) -> List[TensorRef]:
        return [TensorRef("embed", (self.p(self.embed_name),), ("vocab", "d_model")),
                TensorRef("pos_embed", (self.p("embeddings.position_embeddings.weight"),), ("positions", "d_model")),
                TensorRef("token_type_embed", (self.p("embeddings.token_type_embeddings.weight"),),
                          ("types", "d_model")),
                *_norm("embed_norm", self.p("embeddings.LayerNorm"), None, True, aliases=True)]

    def layer_refs(self, i: int) -> List[TensorRef]:
        base = self.p(f"encoder.layer.{i}.")
        return [*_linear("W_q", base + "attention.self.query", ("q_out", "d_model"), i, "b_q"),
                *_linear("W_k", base + "attention.self.key", ("kv_out", "d_model"), i, "b_k"),
                *_linear("W_v", base + "attention.self.value", ("kv_out", "d_model"), i, "b_v"),
                *_linear("W_o", base + "attention.output.dense", ("d_model", "q_out"), i, "b_o"),
                *_norm("ln1", base + "attention.output.LayerNorm", i, True, aliases=True),
                *_linear("W_in", base + "intermediate.dense", ("d_mlp", "d_model"), i, "b_in"),
                *_linear("W_out", base + "output.dense", ("d_model", "d_mlp"), i, "b_out"),
                *_norm("ln2", base + "output.LayerNorm", i, True, aliases=True)]


class GPT2Map(FamilyMap):
    family = "gpt2"
    prefixes = ("", "transformer.")
    embed_name = "wte.weight"
    lm_head_name = "lm_head.weight"
    buffers = (r"h\.\d+\.attn\.(bias|masked_bias)",)     # the causal-mask buffers of old checkpoints

    def global_refs(self) -> List[TensorRef]:
        return [TensorRef("embed", (self.p("wte.weight"),), ("vocab", "d_model")),
                TensorRef("pos_embed", (self.p("wpe.weight"),), ("positions", "d_model")),
                *_norm("final_norm", self.p("ln_f"), None, True)]

    def layer_refs(self, i: int) -> List[TensorRef]:
        base = self.p(f"h.{i}.")
        # Conv1D weights are stored (in, out): transpose to (out, in); c_attn's columns are [Q | K | V]
        fused = [ref for k, (w, b) in enumerate((("W_q", "b_q"), ("W_k", "b_k"), ("W_v", "b_v")))
                 for ref in (TensorRef(w, (base + "attn.c_attn.weight",), ("q_out", "d_model"), True, (k, 3), i),
                             TensorRef(b, (base + "attn.c_attn.bias",), ("q_out",), False, (k, 3), i))]

        def conv(role: str, name: str, axes: Tuple[str, str], bias: str) -> List[TensorRef]:
            return [TensorRef(role, (base + name + ".weight",), axes, True, layer=i),
                    TensorRef(bias, (base + name + ".bias",), axes[:1], layer=i)]
        return [*fused, *conv("W_o", "attn.c_proj", ("d_model", "q_out"), "b_o"),
                *_norm("ln1", base + "ln_1", i, True), *_norm("ln2", base + "ln_2", i, True),
                *conv("W_in", "mlp.c_fc", ("d_mlp", "d_model"), "b_in"),
                *conv("W_out", "mlp.c_proj", ("d_model", "d_mlp"), "b_out")]


class LlamaMap(FamilyMap):
    family = "llama"
    prefixes = ("model.", "")
    embed_name = "embed_tokens.weight"
    lm_head_name = "lm_head.weight"
    buffers = (r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)

    def global_refs(self) -> List[TensorRef]:
        return [TensorRef("embed", (self.p(self.embed_name),), ("vocab", "d_model")),
                *_norm("final_norm", self.p("norm"), None, False)]

    def layer_refs(self, i: int) -> List[TensorRef]:
        base, cfg = self.p(f"layers.{i}."), self.config
        bias = {k: ("b_" + k if has else None) for k, has in cfg.attn_bias.items()}
        mlp_bias = {k: ("b_" + k if cfg.mlp_bias else None) for k in ("gate", "up", "down")}
        return [*_linear("W_q", base + "self_attn.q_proj", ("q_out", "d_model"), i, bias["q"]),
                *_linear("W_k", base + "self_attn.k_proj", ("kv_out", "d_model"), i, bias["k"]),
                *_linear("W_v", base + "self_attn.v_proj", ("kv_out", "d_model"), i, bias["v"]),
                *_linear("W_o", base + "self_attn.o_proj", ("d_model", "q_out"), i, bias["o"]),
                *_norm("ln1", base + "input_layernorm", i, False),
                *_norm("ln2", base + "post_attention_layernorm", i, False),
                *_linear("W_gate", base + "mlp.gate_proj", ("d_mlp", "d_model"), i, mlp_bias["gate"]),
                *_linear("W_up", base + "mlp.up_proj", ("d_mlp", "d_model"), i, mlp_bias["up"]),
                *_linear("W_down", base + "mlp.down_proj", ("d_model", "d_mlp"), i, mlp_bias["down"])]


FAMILY_MAPS = {"bert": BertMap, "gpt2": GPT2Map, "llama": LlamaMap}


def family_map(config: ModelConfig, store: TensorStore) -> FamilyMap:
    """The family's name map, with the prefix (``bert.``, ``transformer.``, ``model.`` or none) found."""
    cls = FAMILY_MAPS[config.family]
    for prefix in cls.prefixes:
        if prefix + cls.embed_name in store:
            return cls(config, prefix)
    tried = [prefix + cls.embed_name for prefix in cls.prefixes]
    names = store.names()
    raise InputError(Diagnosis(
        code="ATT-E328", message=f"no token-embedding tensor for a {config.model_type} checkpoint",
        details=["looked for: " + ", ".join(tried),
                 "the checkpoint has: " + ", ".join(names[:MAX_LISTED]) + (" ..." if len(names) > MAX_LISTED else "")],
        hint="config.json's model_type must match the weights (is this the right folder?)"))


# --------------------------------------------------------------------------- sizes and messages

def _axis_sizes(cfg: ModelConfig) -> Dict[str, Tuple[int, str]]:
    """Symbolic axis -> (size config.json implies, how it says so)."""
    return {
        "d_model": (cfg.d_model, f"{cfg.key('d_model')} {cfg.d_model}"),
        "q_out": (cfg.n_heads * cfg.d_head, f"{cfg.key('n_heads')} {cfg.n_heads} × d_head {cfg.d_head}"
                  f" = {cfg.n_heads * cfg.d_head}"),
        "kv_out": (cfg.n_kv_heads * cfg.d_head, f"{cfg.key('n_kv_heads')} {cfg.n_kv_heads} × d_head {cfg.d_head}"
                   f" = {cfg.n_kv_heads * cfg.d_head}"),
        "d_mlp": (cfg.d_mlp, f"{cfg.key('d_mlp')} {cfg.d_mlp}"),
        "vocab": (cfg.vocab_size, f"{cfg.key('vocab_size')} {cfg.vocab_size}"),
        "positions": (cfg.max_positions, f"{cfg.key('max_positions')} {cfg.max_positions}"),
        "types": (cfg.type_vocab_size, f"{cfg.key('type_vocab_size')} {cfg.type_vocab_size}"),
    }


def _stored_shape(ref: TensorRef, sizes: Dict[str, Tuple[int, str]]) -> Tuple[int, ...]:
    ours = [sizes[a][0] for a in ref.axes]
    if ref.split:
        ours[0] *= ref.split[1]
    return tuple(reversed(ours)) if ref.transpose else tuple(ours)


def _shape_problem(ref: TensorRef, actual: Tuple[int, ...], cfg: ModelConfig) -> Optional[str]:
    """A sentence saying how ``actual`` contradicts config.json, or None when it fits."""
    sizes = _axis_sizes(cfg)
    expected = _stored_shape(ref, sizes)
    if tuple(actual) == expected:
        return None
    if len(actual) != len(expected):
        return f"{ref.role} has shape {list(actual)}, expected {len(expected)} axes {list(expected)}"
    ours = tuple(reversed(actual)) if ref.transpose else tuple(actual)
    parts = ref.split[1] if ref.split else 1
    for axis, symbol in enumerate(ref.axes):
        size, story = sizes[symbol]
        got = ours[axis] // parts if axis == 0 else ours[axis]
        if got == size and (axis or ours[axis] % parts == 0):
            continue
        what = "rows" if axis == 0 else "columns"
        fused = f" (one third of the fused {ours[axis]})" if parts > 1 and axis == 0 else ""
        heads = ""
        if symbol in ("q_out", "kv_out") and got % cfg.d_head == 0:
            heads = f" = {got // cfg.d_head} heads × {cfg.d_head}"
        return (f"{ref.role} has {got} {what}{fused}{heads}, but config.json says {story}"
                f" -- stored shape {list(actual)}, expected {list(expected)}")
    return f"{ref.role} has shape {list(actual)}, expected {list(expected)}"


def _layers_text(layers: Sequence[Optional[int]], n_layers: int) -> str:
    indices = sorted(i for i in layers if i is not None)
    if not indices:
        return ""
    if len(indices) == n_layers and n_layers > 1:
        return f" in all {n_layers} layers"
    return " in layer" + ("s " if len(indices) > 1 else " ") + ", ".join(map(str, indices))


def _listed(names: Sequence[str]) -> List[str]:
    shown = list(names[:MAX_LISTED])
    return shown + ([f"... {len(names) - MAX_LISTED} more"] if len(names) > MAX_LISTED else [])


def parse_layers(selection: Union[str, Iterable[int], None], n_layers: int) -> List[int]:
    """``"0-3,5"`` (or a list of ints, or None for all) -> sorted layer indices; ATT-E333 when out of range."""
    if selection is None:
        return list(range(n_layers))
    indices: List[int] = []
    if isinstance(selection, str):
        for part in filter(None, (p.strip() for p in selection.split(","))):
            match = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+))?", part)
            if not match:
                raise InputError(Diagnosis(code="ATT-E333", message=f"layer selection {selection!r}: {part!r} is "
                                           "not a layer number or a range like 0-3",
                                           hint=f"layers are numbered 0..{n_layers - 1}"))
            first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
            indices.extend(range(first, last + 1))
    else:
        indices = [int(i) for i in selection]
    bad = sorted({i for i in indices if not 0 <= i < n_layers})
    if bad or not indices:
        raise InputError(Diagnosis(code="ATT-E333", message=f"layer selection {selection!r} "
                                   + (f"names layer {bad[0]}, but" if bad else "is empty;")
                                   + f" the model has {n_layers} layers (0..{n_layers - 1})"))
    return sorted(set(indices))


# --------------------------------------------------------------------------- weights

class ModelWeights:
    """A checkpoint's weights in the neutral form, read lazily (see the module docstring)."""

    layout = LAYOUT

    def __init__(self, store: TensorStore, config: ModelConfig, dtype: str = "float32",
                 source: Optional[Path] = None):
        if dtype not in TARGET_DTYPES:
            raise InputError(Diagnosis(code="ATT-E313", message=f"compute dtype {dtype!r} is not supported",
                                       hint="use float32 (default) or float64"))
        self.store, self.config, self.dtype = store, config, dtype
        self.source = source
        self.map = family_map(config, store)
        self.tensors_read: List[str] = []
        self._globals = {ref.role: ref for ref in self.map.global_refs()}
        self._cache: Dict[object, object] = {}

    # ------------------------------------------------------------------ reading

    def _name(self, ref: TensorRef) -> Optional[str]:
        return next((n for n in ref.names if n in self.store), None)

    def _read(self, ref: TensorRef) -> np.ndarray:
        name = self._name(ref)
        if name is None:
            code = "ATT-E330" if ref.bias else "ATT-E328"
            raise InputError(Diagnosis(code=code, message=f"{ref.role} ({ref.names[0]}) is missing from the "
                                       "checkpoint", details=[f"weights: {self.source or ''}"]))
        info = self.store.info(name)
        problem = _shape_problem(ref, info.shape, self.config)
        if problem:
            raise InputError(Diagnosis(code="ATT-E331", message=problem,
                                       details=[f"tensor: {name}", f"config: {self.config.source}"]))
        if not info.is_float:
            raise InputError(Diagnosis(code="ATT-E334", message=f"{ref.role} ({name}) is stored as {info.dtype}, "
                                       "not a floating-point type", hint="quantized checkpoints are not read"))
        array = self.store.read(name, self.dtype)
        self.tensors_read.append(name)
        if ref.split:
            part, parts = ref.split
            width = array.shape[-1] // parts
            array = array[..., part * width:(part + 1) * width]
        return array.T if ref.transpose else array

    def _cached(self, key, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _global(self, role: str) -> Optional[np.ndarray]:
        ref = self._globals.get(role)
        return None if ref is None else self._cached(role, lambda: self._read(ref))

    def _make_norm(self, arrays: Dict[str, np.ndarray], role: str) -> Optional[Norm]:
        if role + ".weight" not in arrays:
            return None
        return Norm(self.config.norm, arrays[role + ".weight"], arrays.get(role + ".bias"), self.config.norm_eps)

    # ------------------------------------------------------------------ the arrays

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def embed(self) -> np.ndarray:
        """The token-embedding table (vocab, d_model); a view onto the file when no conversion is needed."""
        return self._global("embed")

    def embed_rows(self, ids) -> np.ndarray:
        """``embed[ids]`` for any integer array of ids, reading only those rows."""
        ref = self._globals["embed"]
        name = self._name(ref)
        self.tensors_read.append(name)
        return self.store.read_rows(name, np.asarray(ids), self.dtype)

    @property
    def pos_embed(self) -> Optional[np.ndarray]:
        return self._global("pos_embed")

    @property
    def token_type_embed(self) -> Optional[np.ndarray]:
        return self._global("token_type_embed")

    @property
    def embed_norm(self) -> Optional[Norm]:
        return self._global_norm("embed_norm")

    @property
    def final_norm(self) -> Optional[Norm]:
        return self._global_norm("final_norm")

    def _global_norm(self, role: str) -> Optional[Norm]:
        arrays = {key: self._global(key) for key in (role + ".weight", role + ".bias") if key in self._globals}
        return self._make_norm(arrays, role)

    @property
    def unembed(self) -> Optional[np.ndarray]:
        """(vocab, d_model): lm_head, or the token embeddings when tied; None for an encoder / a base model."""
        name = self.map.lm_head_name
        if name is None:
            return None
        if self.config.tie_word_embeddings:
            return self.embed
        if name not in self.store:
            return None
        return self._cached("unembed", lambda: self._read(TensorRef("unembed", (name,), ("vocab", "d_model"))))

    def layer(self, i: int) -> LayerWeights:
        """Block ``i``'s arrays, read on first use."""
        if not 0 <= i < self.n_layers:
            raise InputError(Diagnosis(code="ATT-E333", message=f"layer {i} does not exist: the model has "
                                       f"{self.n_layers} layers (0..{self.n_layers - 1})"))
        return self._cached(("layer", i), lambda: self._make_layer(i))

    def _make_layer(self, i: int) -> LayerWeights:
        arrays = {ref.role: self._read(ref) for ref in self.map.layer_refs(i)}
        norms = {role: self._make_norm(arrays, role) for role in ("ln1", "ln2")}
        plain = {k: v for k, v in arrays.items() if "." not in k}
        return LayerWeights(index=i, **plain, **norms)

    def layers(self, selection: Union[str, Iterable[int], None] = None) -> Iterator[LayerWeights]:
        for i in parse_layers(selection, self.n_layers):
            yield self.layer(i)

    @property
    def stored_dtypes(self) -> Dict[str, int]:
        """How many of the tensors the map uses are stored in each dtype, e.g. {"BF16": 291}."""
        refs = [*self._globals.values(), *(r for i in range(self.n_layers) for r in self.map.layer_refs(i))]
        names = {self._name(ref) for ref in refs} | {self.map.lm_head_name}
        return dict(Counter(self.store.info(name).dtype for name in names if name in self.store))

    # ------------------------------------------------------------------ consistency

    def check_consistency(self) -> List[Diagnosis]:
        """Every way the checkpoint and config.json disagree, as diagnoses (errors and warnings)."""
        return _Checker(self).run()


class _Checker:
    """The silent mistakes made loud: missing, unused, misshapen, non-float, mis-tied tensors."""

    def __init__(self, weights: ModelWeights):
        self.w, self.cfg = weights, weights.config
        self.diagnoses: List[Diagnosis] = []
        self.used: set = set()

    def run(self) -> List[Diagnosis]:
        refs = [*self.w._globals.values(), *(r for i in range(self.cfg.n_layers) for r in self.w.map.layer_refs(i))]
        self._missing_and_shapes(refs)
        self._tied()
        self._unused()
        return self.diagnoses

    def _group(self, code: str, items: Dict[str, List[TensorRef]], severity: str = "error",
               hint: Optional[str] = None, details_of: Callable[[List[TensorRef]], List[str]] = None) -> None:
        for message, refs in items.items():
            text = message + _layers_text([r.layer for r in refs], self.cfg.n_layers)
            details = details_of(refs) if details_of else _listed([r.names[0] for r in refs])
            self.diagnoses.append(Diagnosis(code=code, message=text, severity=severity, hint=hint,
                                            details=details + [f"config: {self.cfg.source}"]))

    def _missing_and_shapes(self, refs: List[TensorRef]) -> None:
        missing: Dict[str, List[TensorRef]] = {}
        missing_bias: Dict[str, List[TensorRef]] = {}
        shapes: Dict[str, List[TensorRef]] = {}
        non_float: Dict[str, List[TensorRef]] = {}
        checked = set()
        for ref in refs:
            name = self.w._name(ref)
            if name is None:
                target = missing_bias if ref.bias else missing
                target.setdefault(f"{ref.role} is missing", []).append(ref)
                continue
            self.used.add(name)
            if name in checked:          # a fused tensor (GPT-2 c_attn) is checked once
                continue
            checked.add(name)
            info = self.w.store.info(name)
            problem = _shape_problem(ref, info.shape, self.cfg)
            if problem:
                shapes.setdefault(problem, []).append(ref)
            if not info.is_float:
                non_float.setdefault(f"{ref.role} is stored as {info.dtype}, not floating point", []).append(ref)
        bias_flags = ", ".join(f"{k}={v}" for k, v in self.cfg.attn_bias.items())
        self._group("ATT-E328", missing, hint="the checkpoint lacks weights the model needs: is it complete?")
        self._group("ATT-E330", missing_bias,
                    hint=f"config.json implies these biases ({self.cfg.model_type}: attention biases {bias_flags}, "
                         f"mlp bias {self.cfg.mlp_bias}); a bias silently taken as zero gives wrong numbers")
        self._group("ATT-E331", shapes,
                    hint="config.json and the weights disagree: fix the config (head counts, head_dim, sizes)")
        self._group("ATT-E334", non_float, hint="quantized checkpoints are not read")

    def _tied(self) -> None:
        name = self.w.map.lm_head_name
        if name is None:
            return
        present = name in self.w.store
        embed_name = self.w._name(self.w._globals["embed"])
        if present:
            self.used.add(name)
        if self.cfg.tie_word_embeddings and present and embed_name:
            lm_head, embed = self.w.store.read(name), self.w.store.read(embed_name)
            if lm_head.shape != embed.shape or not np.array_equal(lm_head, embed):
                self.diagnoses.append(Diagnosis(
                    code="ATT-E332", message=f"tie_word_embeddings is true but {name} differs from {embed_name}",
                    details=[f"shapes {list(lm_head.shape)} and {list(embed.shape)}", f"config: {self.cfg.source}"],
                    hint="set tie_word_embeddings false in config.json if the output layer is trained separately"))
        elif not self.cfg.tie_word_embeddings and not present:
            with_head = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in self.cfg.architectures)
            self.diagnoses.append(Diagnosis(
                code="ATT-E332" if with_head else "ATT-W302", severity="error" if with_head else "warning",
                message=f"tie_word_embeddings is false and the checkpoint has no {name}"
                        + (f" although architectures says {', '.join(self.cfg.architectures)}" if with_head
                           else ": no unembedding (a base model)"),
                details=[f"config: {self.cfg.source}"],
                hint="set tie_word_embeddings true if the output layer shares the token embeddings"
                     if with_head else "logits are unavailable; attention and hidden states are unaffected"))

    def _unused(self) -> None:
        unused: List[str] = []
        notes: Dict[Tuple[str, str], List[str]] = {}
        for name in self.w.store.names():
            if name in self.used:
                continue
            known = self.w.map.ignored(name)
            if known is None:
                unused.append(name)
            elif known[0]:
                notes.setdefault(known, []).append(name)
        for (code, note), names in notes.items():
            self.diagnoses.append(Diagnosis(code=code, severity="info" if code.startswith("ATT-I") else "warning",
                                            message=note, details=_listed(names)))
        if unused:
            self.diagnoses.append(Diagnosis(
                code="ATT-E329", message=f"{len(unused)} tensor(s) in the checkpoint are used by no part of the "
                                         f"{self.cfg.model_type} model", details=_listed(unused) + self._why(unused),
                hint="a weight the model ignores is usually a config.json mismatch (a bias flag, the layer count, "
                     "the model_type)"))

    def _why(self, unused: List[str]) -> List[str]:
        """A likely reason, when the unused names look like biases the config turned off or extra layers."""
        reasons = []
        if any(n.endswith(".bias") for n in unused):
            reasons.append(f"config.json: attention biases {self.cfg.attn_bias}, mlp bias {self.cfg.mlp_bias}")
        numbers = [int(m[1]) for n in unused if (m := re.search(r"\.(\d+)\.", n))]
        if numbers and max(numbers) >= self.cfg.n_layers:
            reasons.append(f"layer {max(numbers)} found, config.json {self.cfg.key('n_layers')} is "
                           f"{self.cfg.n_layers}")
        return reasons


def raise_for_errors(diagnoses: Sequence[Diagnosis]) -> List[Diagnosis]:
    """Raise one InputError carrying every error; return the warnings."""
    errors = [d for d in diagnoses if d.severity == "error"]
    if errors:
        raise InputError(errors)
    return [d for d in diagnoses if d.severity != "error"]


# --------------------------------------------------------------------------- one call

@dataclass
class LoadedModel:
    """What :func:`load_model` found: the files, config, lazy weights and the warnings to show."""

    files: CheckpointFiles
    config: ModelConfig
    weights: ModelWeights
    warnings: List[Diagnosis]


def load_model(source: Union[str, Path], dtype: str = "float32", check: bool = True) -> LoadedModel:
    """Find, read the config of, and lazily open a checkpoint; errors of its consistency check raised together."""
    files = find_checkpoint(source)
    config = load_config(files.config)
    weights = ModelWeights(open_tensors(files.weights), config, dtype=dtype, source=files.weights)
    warnings = raise_for_errors(weights.check_consistency()) if check else []
    return LoadedModel(files, config, weights, warnings)
