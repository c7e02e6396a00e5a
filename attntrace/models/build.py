"""A real model as a spec of transformer blocks: the checkpoint's weights on the text's embeddings.

`model: PATH_OR_PACKAGE` in a spec (or ``attntrace run --model ...``) is read by
:mod:`attntrace.inputs.spec` as a :class:`~attntrace.inputs.spec.ModelRef`;
:func:`resolve` loads the checkpoint (:mod:`attntrace.models.families`),
tokenizes the text, and builds the same :class:`~attntrace.inputs.spec.Spec`
a hand-written `blocks:` spec gives, so every tool (hooks, expect, diff, inject,
exports) works on a real model unchanged.  Every array keeps where it came
from: the checkpoint file and the tensor's role.

All weights are in nn.Linear's (out, in) layout (``layout: linear``); GPT-2's
Conv1D arrives transposed as a view.  Weights are read lazily, layer by layer,
only for the layers computed: ``layers: 0-3`` reads four.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import numpy as np

from attntrace.errors import Location
from attntrace.inputs.sources import Array
from attntrace.inputs.spec import (
    AttentionSpec,
    BlockSpec,
    MaskSpec,
    MLPSpec,
    ModelRef,
    NormSpec,
    PositionalSpec,
    Sequence_,
    Spec,
)
from attntrace.models.families import LoadedModel, Norm, load_model, parse_layers
from attntrace.models.tokenize import TokenizedInput, from_ids, tokenize

DEFAULT_DTYPE = "float32"       # models compute in float32 unless asked (as they run)


def resolve(spec: Spec) -> Spec:
    """The spec with its `model:` turned into embeddings and blocks (a spec without `model:` is returned as is)."""
    if spec.model is None or spec.model_blocks:     # no model, or resolved already
        return spec
    ref = spec.model
    loaded = load_model(ref.source, dtype=ref.dtype or DEFAULT_DTYPE)
    text_input = _input(ref, loaded)
    built = model_spec(loaded, text_input, layers=ref.layers, location=ref.location)
    return dataclasses.replace(built, name=spec.name, description=spec.description or built.description,
                               expect=spec.expect, tolerance=spec.tolerance, hooks=spec.hooks, file=spec.file,
                               document=spec.document, model=ref,
                               notes=list(loaded.warnings) + list(text_input.warnings))


def _input(ref: ModelRef, loaded: LoadedModel) -> TokenizedInput:
    if ref.ids is not None:
        return from_ids(ref.ids, loaded.config, tokenizer=loaded.files.tokenizer)
    if loaded.files.tokenizer is None:
        from attntrace.errors import input_error
        raise input_error("ATT-E336", f"{loaded.files.root} has no tokenizer.json, so text cannot be tokenized",
                          ref.location, hint="give token ids instead: ids: [101, 2023, 102] (or --ids)")
    return tokenize(ref.text, loaded.files.tokenizer, loaded.config)


def model_spec(loaded: LoadedModel, text_input: TokenizedInput, *, layers: Optional[str] = None,
               location: Optional[Location] = None) -> Spec:
    """The spec of `loaded` on `text_input`: blocks 0..max(layers) (all by default)."""
    cfg, weights = loaded.config, loaded.weights
    shown = parse_layers(layers, cfg.n_layers)
    last = max(shown)
    where = str(loaded.files.weights)

    def array(name: str, data: Optional[np.ndarray]) -> Optional[Array]:
        return None if data is None else Array(name, data, Location(where, None, None, name))

    ids = np.asarray(text_input.ids, dtype=np.int64)
    embeddings = array("embeddings (token rows of embed)", weights.embed_rows(ids))
    positional = PositionalSpec(location=location)
    if cfg.positional == "learned":
        positional = PositionalSpec(kind="learned", table=array("pos_embed", weights.pos_embed), location=location)
        if weights.token_type_embed is not None:
            positional.type_table = array("token_type_embed", weights.token_type_embed)
            positional.type_ids = array("token_type_ids", np.asarray(text_input.token_type_ids, dtype=np.float64))
    elif cfg.positional == "rope":
        positional = PositionalSpec(kind="rope", base=float(cfg.rope_theta), pairing="half", location=location)
    padding = np.asarray(text_input.attention_mask)
    blocks = [_block(cfg, weights.layer(i), i, padding, array) for i in range(last + 1)]
    tokens = text_input.tokens[0]
    source = Sequence_(list(tokens), embeddings, location or Location(where, None, None, "tokens"))
    complete = last == cfg.n_layers - 1           # the final norm follows the last layer only
    return Spec(name=f"{cfg.model_type} {Path(loaded.files.root).name}", source=source, attention=None,
                positional=positional, model_blocks=blocks, description=_describe(loaded, text_input, shown),
                embed_norm=_norm(weights.embed_norm, "embed_norm", array),
                final_norm=_norm(weights.final_norm, "ln_final", array) if complete else None,
                shown_layers=shown if shown != list(range(cfg.n_layers)) else None,
                batch_tokens=[list(t) for t in text_input.tokens] if len(text_input.tokens) > 1 else None,
                token_ids=ids)


def _block(cfg, layer, i: int, padding: np.ndarray, array) -> BlockSpec:
    name = f"blocks.{i}."
    mask = MaskSpec(causal=cfg.causal, window=cfg.window(i),
                    padding=array(name + "padding (attention_mask)", padding.astype(np.float64))
                    if not padding.all() else None)
    attention = AttentionSpec(
        heads=cfg.n_heads, kv_heads=cfg.n_kv_heads if cfg.n_kv_heads != cfg.n_heads else None, d_head=cfg.d_head,
        layout="linear", scale="auto", mask=mask,
        **{key: array(name + "attn." + key, getattr(layer, key))
           for key in ("W_q", "W_k", "W_v", "W_o", "b_q", "b_k", "b_v", "b_o")})
    attention.locations["attention"] = Location(attention.W_q.location.file, None, None, name + "attn")
    mlp_names = ("W_gate", "W_up", "W_down", "b_gate", "b_up", "b_down") if cfg.mlp_gated else \
        ("W_in", "b_in", "W_out", "b_out")
    mlp = MLPSpec(activation=cfg.activation, layout="linear",
                  weights={key: array(name + "mlp." + key, getattr(layer, key)) for key in mlp_names
                           if getattr(layer, key) is not None})
    return BlockSpec(attention=attention, placement=cfg.placement, ln1=_norm(layer.ln1, name + "ln1", array),
                     ln2=_norm(layer.ln2, name + "ln2", array), mlp=mlp, residual=True)


def _norm(norm: Optional[Norm], name: str, array) -> Optional[NormSpec]:
    if norm is None:
        return None
    return NormSpec(kind=norm.kind, weight=array(name + ".weight", norm.weight),
                    bias=array(name + ".bias", norm.bias), eps=norm.eps)


def _describe(loaded: LoadedModel, text_input: TokenizedInput, shown: List[int]) -> str:
    cfg = loaded.config
    stored = ", ".join(sorted(loaded.weights.stored_dtypes)) if loaded.weights.stored_dtypes else "?"
    text = f"{cfg.model_type} from {loaded.files.origin}: {cfg.n_layers} layers × {cfg.n_heads} heads, " \
           f"d_model {cfg.d_model}, weights stored as {stored}, computed in {loaded.weights.dtype}"
    if len(shown) != cfg.n_layers:
        text += f"; layers {shown[0]}–{shown[-1]} shown" if len(shown) > 1 else f"; layer {shown[0]} shown"
    return text


def model_facts(ref: ModelRef):
    """(vocab size, BOS id or None, ids to avoid) of a model: what a repeated random sequence may use.

    Special and unused tokens ([CLS], [unused12], <|endoftext|> ...) are avoided; they come from
    tokenizer.json (its added tokens, and vocabulary entries written in brackets)."""
    import json
    import re

    from attntrace.models.checkpoint import find_checkpoint
    from attntrace.models.config import load_config
    files = find_checkpoint(ref.source)
    cfg = load_config(files.config)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    avoid = {i for i in (cfg.pad_token_id, cfg.bos_token_id, *eos) if i is not None}
    bos = cfg.bos_token_id
    if files.tokenizer is not None:
        document = json.loads(Path(files.tokenizer).read_text(encoding="utf-8"))
        added = {t["content"]: t["id"] for t in document.get("added_tokens", []) if t.get("special")}
        avoid |= set(added.values())
        vocab = (document.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            avoid |= {i for token, i in vocab.items() if re.fullmatch(r"\[.*\]|<\|.*\|>|<.*>", token)}
        if bos is None:                    # BERT: the classifier token opens every sequence
            bos = added.get("[CLS]", added.get("<s>"))
    return cfg.vocab_size, bos, sorted(avoid)
