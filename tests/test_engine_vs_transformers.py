"""attntrace's engine on real checkpoints against transformers, hook by hook, every layer.

``attntrace.run({"model": ..., "text" | "ids": ..., "dtype": ...}, keep="all")`` builds blocks
from the checkpoint and runs attntrace's own engine; transformers runs the same checkpoint
(``AutoModel``, eager attention, ``output_attentions=True, output_hidden_states=True``, torch
CPU) on the same token ids.  Compared, in every layer: the attention pattern, the residual
stream (resid_pre, resid_mid, resid_post), both norms' outputs, Q/K/V before RoPE, the heads
concatenated, the attention output, the MLP's hidden layer before and after the activation,
the MLP output; and the embeddings and the final norm.  transformers' intermediate values
come from forward hooks on its modules (:data:`TAPS`), its outputs from ``hidden_states`` and
``attentions``.  Max abs error ≤ 1e-10 in float64 (transformers made float64-faithful, see
``model_fixtures.float64_faithful``) and ≤ 1e-4 in float32.

Models: the real all-MiniLM-L6-v2 (one text, a padded batch of three, a Chinese text), and tiny
random checkpoints from ``model_fixtures``: GPT-2, Llama with GQA, Mistral with a sliding
window shorter than the text, Qwen2 with its window on layer 1 only, and a Qwen2 whose config
holds a window that must not apply (``use_sliding_window: false``) -- on one text and on a
right-padded batch of three.

Padding on decoders: a padding query whose every key is blocked (a sliding window over padding
only) has an all-zero row in attntrace (safe softmax, ATT-W203) but a uniform row in
transformers; exactly those rows -- computed here from the mask geometry, not read from either
side -- and what flows from them are left out, and attntrace's zeros there are asserted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_fixtures import (  # noqa: E402  (torch, transformers and tokenizers are required there)
    TEXTS,
    TOL,
    float64_faithful,
    hf_inputs,
    hf_model,
    minilm_folder,
    tiny_checkpoint,
    torch,
    transformers,
)

import attntrace  # noqa: E402

ONE = [[3, 17, 5, 9, 31, 2, 11]]
BATCH = [[3, 17, 5, 9, 31, 2, 11], [8, 1, 25, 4, 39], [6, 7]]       # ragged: attntrace pads on the right
CHINESE = "我爱北京天安门，今天天气很好。"

# What each tiny model is, independently of both implementations: causal, and the window per layer.
TINY_MASKS = {
    "gpt2": ("gpt2", [None, None]),
    "llama": ("llama", [None, None]),
    "mistral": ("llama", [3, 3]),
    "qwen2": ("llama", [None, 2]),
    "qwen2_window_off": ("llama", [None, None]),
}

# attntrace hook -> where transformers holds the same numbers: (module path, "in" | "out", part).
# part (k, n): the k-th of n equal slices of the last axis (GPT-2's fused c_attn).
# Per-layer entries hold {L}.  Hooks listed in BEFORE_ATTENTION are computed before the layer's
# attention, so a row emptied by that attention does not yet affect them.
TAPS = {
    "bert": {
        "hook_embed": ("embeddings.word_embeddings", "out"),
        "hook_pos_embed": ("embeddings.LayerNorm", "in"),
        "embed.ln.hook_normalized": ("embeddings.LayerNorm", "out"),
        "blocks.{L}.attn.hook_q": ("encoder.layer.{L}.attention.self.query", "out"),
        "blocks.{L}.attn.hook_k": ("encoder.layer.{L}.attention.self.key", "out"),
        "blocks.{L}.attn.hook_v": ("encoder.layer.{L}.attention.self.value", "out"),
        "blocks.{L}.attn.hook_z_concat": ("encoder.layer.{L}.attention.output.dense", "in"),
        "blocks.{L}.hook_attn_out": ("encoder.layer.{L}.attention.output.dense", "out"),
        "blocks.{L}.hook_resid_mid": ("encoder.layer.{L}.attention.output.LayerNorm", "in"),
        "blocks.{L}.ln1.hook_normalized": ("encoder.layer.{L}.attention.output.LayerNorm", "out"),
        "blocks.{L}.mlp.hook_pre": ("encoder.layer.{L}.intermediate.dense", "out"),
        "blocks.{L}.mlp.hook_post": ("encoder.layer.{L}.output.dense", "in"),
        "blocks.{L}.hook_mlp_out": ("encoder.layer.{L}.output.dense", "out"),
        "blocks.{L}.hook_resid_post": ("encoder.layer.{L}.output.LayerNorm", "in"),
        "blocks.{L}.ln2.hook_normalized": ("encoder.layer.{L}.output.LayerNorm", "out"),
    },
    "gpt2": {
        "hook_embed": ("wte", "out"),
        "hook_pos_embed": ("drop", "out"),
        "blocks.{L}.ln1.hook_normalized": ("h.{L}.ln_1", "out"),
        "blocks.{L}.attn.hook_q": ("h.{L}.attn.c_attn", "out", (0, 3)),
        "blocks.{L}.attn.hook_k": ("h.{L}.attn.c_attn", "out", (1, 3)),
        "blocks.{L}.attn.hook_v": ("h.{L}.attn.c_attn", "out", (2, 3)),
        "blocks.{L}.attn.hook_z_concat": ("h.{L}.attn.c_proj", "in"),
        "blocks.{L}.hook_attn_out": ("h.{L}.attn.c_proj", "out"),
        "blocks.{L}.hook_resid_mid": ("h.{L}.ln_2", "in"),
        "blocks.{L}.ln2.hook_normalized": ("h.{L}.ln_2", "out"),
        "blocks.{L}.mlp.hook_pre": ("h.{L}.mlp.c_fc", "out"),
        "blocks.{L}.mlp.hook_post": ("h.{L}.mlp.c_proj", "in"),
        "blocks.{L}.hook_mlp_out": ("h.{L}.mlp", "out"),
        "blocks.{L}.hook_resid_post": ("h.{L}", "out"),
        "ln_final.hook_normalized": ("ln_f", "out"),
    },
    "llama": {                                       # llama, mistral, qwen2
        "hook_embed": ("embed_tokens", "out"),
        "blocks.{L}.ln1.hook_normalized": ("layers.{L}.input_layernorm", "out"),
        "blocks.{L}.attn.hook_q": ("layers.{L}.self_attn.q_proj", "out"),
        "blocks.{L}.attn.hook_k": ("layers.{L}.self_attn.k_proj", "out"),
        "blocks.{L}.attn.hook_v": ("layers.{L}.self_attn.v_proj", "out"),
        "blocks.{L}.attn.hook_z_concat": ("layers.{L}.self_attn.o_proj", "in"),
        "blocks.{L}.hook_attn_out": ("layers.{L}.self_attn.o_proj", "out"),
        "blocks.{L}.hook_resid_mid": ("layers.{L}.post_attention_layernorm", "in"),
        "blocks.{L}.ln2.hook_normalized": ("layers.{L}.post_attention_layernorm", "out"),
        "blocks.{L}.mlp.hook_pre": ("layers.{L}.mlp.gate_proj", "out"),
        "blocks.{L}.mlp.hook_post": ("layers.{L}.mlp.down_proj", "in"),
        "blocks.{L}.hook_mlp_out": ("layers.{L}.mlp", "out"),
        "blocks.{L}.hook_resid_post": ("layers.{L}", "out"),
        "ln_final.hook_normalized": ("norm", "out"),
    },
}
BEFORE_ATTENTION = ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v")
PRE_NORM_BEFORE_ATTENTION = BEFORE_ATTENTION + ("ln1.hook_normalized",)


# --------------------------------------------------------------------------- transformers, with taps

def hf_tapped(folder, dtype, family, ids, mask, token_type_ids=None):
    """transformers' forward on `ids`: {attntrace hook name: numpy array} from its outputs and module taps."""
    model = hf_model(str(folder), dtype)
    n_layers = model.config.num_hidden_layers
    modules = dict(model.named_modules())
    taps, handles = {}, []
    for hook, (path, side, *part) in _expand(TAPS[family], n_layers).items():
        def record(module, args, kwargs, output, hook=hook, side=side, part=part):
            value = (args[0] if args else next(iter(kwargs.values()))) if side == "in" else output
            value = value[0] if isinstance(value, tuple) else value
            assert hook not in taps, f"{hook}: module called twice"
            taps[hook] = _slice(value.detach().clone().numpy(), part[0] if part else None)
        handles.append(modules[path].register_forward_hook(record, with_kwargs=True))
    try:
        with torch.no_grad(), float64_faithful():
            out = model(**hf_inputs(ids, mask, token_type_ids), output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    assert len(out.hidden_states) == n_layers + 1 and len(out.attentions) == n_layers
    final = f"blocks.{n_layers - 1}.ln2.hook_normalized" if family == "bert" else "ln_final.hook_normalized"
    outputs = {f"blocks.{L}.hook_resid_pre": h.numpy() for L, h in enumerate(out.hidden_states[:-1])}
    outputs.update({f"blocks.{L}.attn.hook_pattern": a.numpy() for L, a in enumerate(out.attentions)})
    outputs[final] = out.hidden_states[-1].numpy()
    for hook, value in outputs.items():           # where a module tap holds the same array, they agree
        if hook in taps:
            np.testing.assert_array_equal(taps[hook], value, err_msg=hook)
    return {**taps, **outputs}


def _expand(taps, n_layers):
    expanded = {}
    for hook, where in taps.items():
        layers = range(n_layers) if "{L}" in hook else [None]
        for L in layers:
            expanded[hook.format(L=L)] = (where[0].format(L=L), *where[1:])
    return expanded


def _slice(array, part):
    if part is None:
        return array
    k, n = part
    width = array.shape[-1] // n
    return array[..., k * width:(k + 1) * width]


# --------------------------------------------------------------------------- attntrace

def attntrace_trace(folder, dtype, *, ids=None, text=None, layers=None):
    spec = {"model": str(folder), "dtype": dtype, **({"ids": ids} if ids is not None else {"text": text})}
    if layers is not None:
        spec["layers"] = layers
    trace = attntrace.run(spec, keep="all")
    errors = [d for d in trace.diagnoses if d.severity == "error"]
    assert not errors, errors
    return trace


# --------------------------------------------------------------------------- the comparison

def blocked_rows(causal: bool, window, key_mask: np.ndarray) -> np.ndarray:
    """(batch, seq) True where a query may attend to no key at all: causal ∧ window ∧ key padding."""
    seq = key_mask.shape[1]
    i, j = np.indices((seq, seq))
    keep = (j <= i) if causal else np.ones((seq, seq), bool)
    if window is not None:
        keep &= j > i - window                   # transformers' window: i - w < j <= i
    return ~(keep[None] & (key_mask[:, None, :] != 0)).any(axis=-1)


def compare(trace, theirs: dict, dtype: str, empty_by_layer, *, pre_norm: bool, layers=None) -> dict:
    """Max abs error per compared hook; asserts each is within TOL[dtype] and that empty rows are zeros."""
    n_layers = len(empty_by_layer)
    computed = range(n_layers) if layers is None else range(max(layers) + 1)
    before_attention = PRE_NORM_BEFORE_ATTENTION if pre_norm else BEFORE_ATTENTION
    undefined = np.zeros_like(empty_by_layer[0])       # positions that lost every key at some layer so far
    skip_of = {}
    for L in computed:
        before = undefined
        undefined = undefined | empty_by_layer[L]
        for hook in theirs:
            if hook.startswith(f"blocks.{L}."):
                skip_of[hook] = before if hook.endswith(before_attention) else undefined
        pattern = trace[f"blocks.{L}.attn.hook_pattern"]
        gone = np.broadcast_to(empty_by_layer[L][:, None, :, None], pattern.shape)
        assert (pattern[gone] == 0).all(), f"layer {L}: a query with no key must get an all-zero row"
    skip_of["ln_final.hook_normalized"] = undefined
    errors, magnitude = {}, {}
    for hook, expected in theirs.items():
        if hook.startswith("blocks.") and int(hook.split(".")[1]) not in computed:
            assert hook not in trace, f"{hook}: computed although only layers {list(computed)} were asked for"
            continue
        if hook == "ln_final.hook_normalized" and len(computed) < n_layers:
            continue
        mine = trace[hook]
        assert mine.dtype == np.dtype(dtype), f"{hook}: {mine.dtype}"
        expected = expected.reshape(mine.shape)         # Q/K/V: (batch, seq, heads·d) -> (batch, seq, heads, d)
        skip = skip_of.get(hook, np.zeros_like(undefined))
        rows = skip[:, None, :, None] if hook.endswith("hook_pattern") else skip.reshape(skip.shape + (1,) * (
            mine.ndim - 2))
        keep = ~np.broadcast_to(rows, mine.shape)
        errors[hook] = float(np.max(np.abs(mine[keep] - expected[keep])))
        magnitude[hook] = max(1.0, float(np.max(np.abs(expected[keep]), initial=0.0)))
    # rounding grows with the values: float32 holds ~7 digits of an MLP output near 100, not 4 decimals
    bad = {h: e for h, e in errors.items() if not e <= TOL[dtype] * magnitude[h]}
    assert not bad, f"{dtype}: max abs error above {TOL[dtype]} × max(1, |value|): " + ", ".join(
        f"{h} {e:.3g} (|value| ≤ {magnitude[h]:.3g})" for h, e in bad.items())
    return errors


def padded(ids_rows, pad_id):
    width = max(len(r) for r in ids_rows)
    ids = np.full((len(ids_rows), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(ids_rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    return ids, mask


# --------------------------------------------------------------------------- tiny decoders

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {name: tiny_checkpoint(tmp_path_factory, name) for name in TINY_MASKS}


def run_tiny(folder, name, dtype, ids_rows):
    family, windows = TINY_MASKS[name]
    pad_id = json.loads((folder / "config.json").read_text())["pad_token_id"]   # what ragged ids are padded with
    ids, mask = padded(ids_rows, pad_id)
    trace = attntrace_trace(folder, dtype, ids=ids_rows)
    theirs = hf_tapped(folder, dtype, family, ids, mask)
    empty = [blocked_rows(True, window, mask) for window in windows]
    return trace, theirs, empty, compare(trace, theirs, dtype, empty, pre_norm=True)


@pytest.mark.parametrize("ids_rows", [ONE, BATCH], ids=["one", "batch3"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(TINY_MASKS))
def test_tiny_decoder_every_hook_matches_transformers(tiny, name, dtype, ids_rows):
    trace, theirs, empty, errors = run_tiny(tiny[name], name, dtype, ids_rows)
    n_layers = len(empty)
    per_layer = [h.replace("{L}", "0") for h in TAPS[TINY_MASKS[name][0]] if "{L}" in h]
    for L in range(n_layers):                            # nothing was silently left uncompared
        assert {h.replace("blocks.0.", f"blocks.{L}.") for h in per_layer} <= errors.keys()
        assert {f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.hook_resid_pre"} <= errors.keys()
    # hook_embed is compared at every position, padding included: attntrace padded with the same id
    assert {"hook_embed", "ln_final.hook_normalized"} <= errors.keys()
    assert trace["hook_embed"].shape[:2] == (len(ids_rows), len(ids_rows[0]))


def test_the_tiny_inputs_exercise_windows_and_empty_rows(tiny):
    """The masks assumed above are transformers' own; the batch really has rows with no key."""
    for name, (_, windows) in TINY_MASKS.items():
        folder = tiny[name]
        ids, mask = padded(BATCH, json.loads((folder / "config.json").read_text())["pad_token_id"])
        theirs = hf_tapped(folder, "float64", TINY_MASKS[name][0], ids, mask)
        for L, window in enumerate(windows):
            pattern = theirs[f"blocks.{L}.attn.hook_pattern"]
            empty = blocked_rows(True, window, mask)
            i, j = np.indices(pattern.shape[-2:])
            keep = (j <= i) & (j > i - (window or len(i))) & (mask[:, None, None, :] != 0)
            live = np.broadcast_to(~empty[:, None, :, None], pattern.shape)
            assert (pattern[live & ~keep] == 0).all() and (pattern[live & keep] > 0).all(), (name, L)
            assert np.allclose(pattern[~live], 1 / pattern.shape[-1]), "transformers: uniform where no key is left"
    assert blocked_rows(True, 3, padded(BATCH, 0)[1]).any()                 # mistral: a window over padding only
    assert blocked_rows(True, 2, padded(BATCH, 0)[1]).sum() > blocked_rows(True, 3, padded(BATCH, 0)[1]).sum()
    assert not blocked_rows(True, None, padded(BATCH, 0)[1]).any()          # causal + right padding: never empty
    assert 3 < len(ONE[0]) and 2 < len(ONE[0])                                # the windows are shorter than the text


def test_qwen2_window_applies_only_when_use_sliding_window(tiny):
    """use_sliding_window: false with a sliding_window value (as released Qwen2 configs): no window anywhere."""
    config = json.loads((tiny["qwen2_window_off"] / "config.json").read_text())
    assert config["sliding_window"] == 2 and config["use_sliding_window"] is False
    for name, expect_zeros in (("qwen2_window_off", False), ("qwen2", True)):
        trace = attntrace_trace(tiny[name], "float64", ids=ONE)
        last = trace["blocks.1.attn.hook_pattern"][0]
        assert (last[:, 6, :5] == 0).all() == expect_zeros, name      # query 6 with window 2 keeps keys 5, 6 only
        assert (trace["blocks.0.attn.hook_pattern"][0][:, 6, :] > 0).all()   # layer 0 never has a window


# --------------------------------------------------------------------------- the real MiniLM

@pytest.fixture(scope="module")
def minilm():
    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return folder, tokenizer


def run_minilm(minilm, text, dtype, layers=None):
    folder, tokenizer = minilm
    encoded = tokenizer(text if isinstance(text, list) else [text], padding=True, return_tensors="np")
    trace = attntrace_trace(folder, dtype, text=text, layers=layers)
    expected_tokens = [tokenizer.convert_ids_to_tokens(row) for row in encoded["input_ids"]]
    assert (trace.spec.batch_tokens or [trace.spec.tokens]) == expected_tokens
    theirs = hf_tapped(folder, dtype, "bert", encoded["input_ids"], encoded["attention_mask"],
                       encoded["token_type_ids"])
    n_layers = hf_model(str(folder), dtype).config.num_hidden_layers
    empty = [blocked_rows(False, None, encoded["attention_mask"])] * n_layers
    shown = None if layers is None else [int(x) for x in layers.split("-")]
    return trace, encoded, compare(trace, theirs, dtype, empty, pre_norm=False, layers=shown)


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS, CHINESE], ids=["one", "batch3", "chinese"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_minilm_every_hook_matches_transformers(minilm, text, dtype):
    trace, encoded, errors = run_minilm(minilm, text, dtype)
    if isinstance(text, list):
        assert len(set(encoded["attention_mask"].sum(axis=1).tolist())) == 3        # really padded, three lengths
    if text is CHINESE:
        # one token per character, as BERT splits CJK (several, like '爱', are [UNK] in MiniLM's vocabulary)
        assert len(trace.spec.tokens) == len(CHINESE) + 2 and "北" in trace.spec.tokens
    assert len([h for h in errors if h.endswith("hook_pattern")]) == 6
    assert len([h for h in errors if h.startswith("blocks.5.")]) == 14


def test_minilm_first_layers_only(minilm):
    """layers 0-1: blocks 0 and 1 computed (equal to the full forward's), nothing after them."""
    trace, _, errors = run_minilm(minilm, TEXTS[0], "float64", layers="0-1")
    assert not [h for h in trace.arrays if h.startswith(("blocks.2.", "blocks.5."))]
    assert "blocks.1.ln2.hook_normalized" in errors and "blocks.1.attn.hook_pattern" in errors
