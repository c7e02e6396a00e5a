"""Name maps → ModelWeights: layouts, laziness, and every silent mistake made loud on broken checkpoints."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_checkpoints import CONFIGS, random_tensors, write_checkpoint  # noqa: E402

from attntrace.errors import InputError  # noqa: E402
from attntrace.models.families import load_model, parse_layers  # noqa: E402


def diagnoses_of(folder, **kw):
    """All diagnoses of a checkpoint: load_model raises the errors together and returns the warnings."""
    try:
        return load_model(folder, **kw).warnings
    except InputError as exc:
        return exc.diagnoses


def codes(diagnoses):
    return sorted(d.code for d in diagnoses)


def full_text(d):
    return " ".join([d.message, d.hint or "", *d.details])


# --------------------------------------------------------------------------- layouts

def test_bert_arrays_are_the_checkpoint_linear_weights(tmp_path):
    tensors = random_tensors("bert", CONFIGS["bert"])
    weights = load_model(write_checkpoint(tmp_path / "b", "bert", tensors=tensors)).weights
    layer = weights.layer(1)
    p = "encoder.layer.1."
    pairs = {"W_q": "attention.self.query.weight", "b_k": "attention.self.key.bias",
             "W_v": "attention.self.value.weight", "W_o": "attention.output.dense.weight",
             "W_in": "intermediate.dense.weight", "W_out": "output.dense.weight", "b_out": "output.dense.bias"}
    for field, name in pairs.items():
        np.testing.assert_array_equal(getattr(layer, field), tensors[p + name])
    np.testing.assert_array_equal(layer.ln1.weight, tensors[p + "attention.output.LayerNorm.weight"])
    np.testing.assert_array_equal(layer.ln2.bias, tensors[p + "output.LayerNorm.bias"])
    assert layer.ln1.kind == "layernorm" and layer.ln1.eps == 1e-12 and layer.W_gate is None
    np.testing.assert_array_equal(weights.token_type_embed, tensors["embeddings.token_type_embeddings.weight"])
    np.testing.assert_array_equal(weights.embed_rows([[3, 1]]), tensors["embeddings.word_embeddings.weight"][[[3, 1]]])
    assert weights.final_norm is None and weights.unembed is None and weights.layout == "linear"


def test_gpt2_conv1d_is_split_and_transposed(tmp_path):
    tensors = random_tensors("gpt2", CONFIGS["gpt2"])
    weights = load_model(write_checkpoint(tmp_path / "g", "gpt2", tensors=tensors)).weights
    d = CONFIGS["gpt2"]["n_embd"]
    c_attn, c_bias = tensors["transformer.h.0.attn.c_attn.weight"], tensors["transformer.h.0.attn.c_attn.bias"]
    layer = weights.layer(0)
    x = np.random.default_rng(1).normal(size=(3, d)).astype(np.float32)
    fused = x @ c_attn + c_bias                                    # what Conv1D computes: x @ W + b, W (in, out)
    for k, (W, b) in enumerate(((layer.W_q, layer.b_q), (layer.W_k, layer.b_k), (layer.W_v, layer.b_v))):
        assert W.shape == (d, d)
        np.testing.assert_allclose(x @ W.T + b, fused[:, k * d:(k + 1) * d], rtol=1e-6)
    np.testing.assert_array_equal(layer.W_in, tensors["transformer.h.0.mlp.c_fc.weight"].T)
    np.testing.assert_array_equal(layer.W_out, tensors["transformer.h.0.mlp.c_proj.weight"].T)
    assert layer.W_q.base is not None                               # views, not copies
    assert weights.unembed is weights.embed                         # tied
    np.testing.assert_array_equal(weights.final_norm.bias, tensors["transformer.ln_f.bias"])


def test_llama_arrays_and_dtypes(tmp_path):
    tensors = random_tensors("llama", CONFIGS["llama"])
    folder = write_checkpoint(tmp_path / "l", "llama", tensors=tensors)
    weights = load_model(folder, dtype="float64").weights
    layer = weights.layer(1)
    assert layer.W_k.shape == (4, 8) and layer.W_q.shape == (8, 8) and layer.b_q is None
    np.testing.assert_array_equal(layer.W_gate, tensors["model.layers.1.mlp.gate_proj.weight"])
    assert layer.W_gate.dtype == np.float64 and layer.ln1.kind == "rmsnorm" and layer.ln1.bias is None
    np.testing.assert_array_equal(weights.unembed, tensors["lm_head.weight"])
    assert weights.stored_dtypes == {"F32": 21}
    assert load_model(folder).weights.layer(0).W_q.dtype == np.float32
    with pytest.raises(InputError) as e:
        load_model(folder, dtype="float16")
    assert e.value.diagnosis.code == "ATT-E313"


def test_prefixes_aliases_and_known_extras(tmp_path):
    def bert_style(t):
        for name in list(t):
            tf_name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            t["bert." + tf_name] = t.pop(name)
        t["cls.predictions.bias"] = np.zeros(20, np.float32)
        t["bert.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    found = diagnoses_of(write_checkpoint(tmp_path / "b", "bert", edit=bert_style))
    assert codes(found) == ["ATT-I300", "ATT-I301"]
    assert load_model(tmp_path / "b").weights.layer(0).ln2.weight.shape == (8,)

    def unprefixed(t):
        for name in list(t):
            t[name.removeprefix("model.").removeprefix("transformer.")] = t.pop(name)
    for family in ("llama", "gpt2"):
        folder = write_checkpoint(tmp_path / family, family, edit=unprefixed)
        weights = load_model(folder).weights
        assert weights.map.prefix == "" and weights.layer(1).W_o.shape == (8, 8)

    def buffers(t):
        t["transformer.h.0.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)
        t["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    assert diagnoses_of(write_checkpoint(tmp_path / "g2", "gpt2", edit=buffers)) == []


def test_lazy_layers(tmp_path):
    weights = load_model(write_checkpoint(tmp_path / "l", "llama")).weights
    assert weights.tensors_read == []
    list(weights.layers("1"))
    assert weights.tensors_read and all(n.startswith("model.layers.1.") for n in weights.tensors_read)
    first = weights.layer(1)
    assert weights.layer(1) is first                                  # read once
    with pytest.raises(InputError) as e:
        weights.layer(2)
    assert e.value.diagnosis.code == "ATT-E333"


def test_parse_layers():
    assert parse_layers("0-2, 5", 6) == [0, 1, 2, 5]
    assert parse_layers(None, 3) == [0, 1, 2] and parse_layers([2, 0], 3) == [0, 2]
    for bad in ("0-6", "x", "3-1", "-1"):
        with pytest.raises(InputError) as e:
            parse_layers(bad, 6)
        assert e.value.diagnosis.code == "ATT-E333"


# --------------------------------------------------------------------------- silent mistakes made loud

def test_clean_checkpoints_have_no_errors(tmp_path):
    for family in CONFIGS:
        found = diagnoses_of(write_checkpoint(tmp_path / family, family))
        assert [d.severity for d in found] == (["info"] if family == "bert" else [])     # the unused pooler: a note


def test_unused_tensor(tmp_path):
    def extra(t):
        t["encoder.layer.0.attention.self.extra.weight"] = np.ones((8, 8), np.float32)
    found = [x for x in diagnoses_of(write_checkpoint(tmp_path / "b", "bert", edit=extra)) if x.severity == "error"]
    assert codes(found) == ["ATT-E329"]
    assert "encoder.layer.0.attention.self.extra.weight" in full_text(found[0])


def test_extra_layer_is_named(tmp_path):
    folder = write_checkpoint(tmp_path / "l", "llama", config_changes={"num_hidden_layers": 1})
    (found,) = diagnoses_of(folder)
    assert found.code == "ATT-E329" and "layer 1 found" in full_text(found)
    assert "num_hidden_layers is 1" in full_text(found)


def test_missing_bias(tmp_path):
    def drop(t):
        del t["encoder.layer.1.attention.self.query.bias"]
    (found,) = [d for d in diagnoses_of(write_checkpoint(tmp_path / "b", "bert", edit=drop)) if d.severity == "error"]
    assert found.code == "ATT-E330" and "b_q" in found.message and "layer 1" in found.message
    assert "encoder.layer.1.attention.self.query.bias" in full_text(found)


def test_config_promises_biases_the_weights_lack(tmp_path):
    folder = write_checkpoint(tmp_path / "l", "llama", config_changes={"attention_bias": True})
    found = diagnoses_of(folder)
    assert codes(found) == ["ATT-E330"] * 4                 # b_q b_k b_v b_o
    assert all("in all 2 layers" in d.message for d in found)
    assert "attention biases q=True" in found[0].hint


def test_biases_the_config_does_not_mention(tmp_path):
    with_biases = dict(CONFIGS["llama"], attention_bias=True)
    tensors = random_tensors("llama", with_biases)
    (found,) = diagnoses_of(write_checkpoint(tmp_path / "l", "llama", tensors=tensors))
    assert found.code == "ATT-E329" and "model.layers.0.self_attn.q_proj.bias" in full_text(found)
    assert "'q': False" in full_text(found)                # the likely reason: the config's bias flags


def test_head_count_contradicts_the_weights(tmp_path):
    folder = write_checkpoint(tmp_path / "l", "llama", config_changes={"num_key_value_heads": 2})
    found = diagnoses_of(folder)
    assert codes(found) == ["ATT-E331", "ATT-E331"]              # W_k and W_v
    message = found[0].message
    assert "W_k has 4 rows = 1 heads × 4" in message and "num_key_value_heads 2 × d_head 4 = 8" in message
    assert "in all 2 layers" in message


def test_head_dim_contradicts_the_weights(tmp_path):
    folder = write_checkpoint(tmp_path / "l", "llama", config_changes={"head_dim": 8, "num_key_value_heads": 1})
    found = diagnoses_of(folder)
    assert {d.code for d in found} == {"ATT-E331"}
    assert any("W_q has 8 rows = 1 heads × 8, but config.json says num_attention_heads 2 × d_head 8 = 16"
               in d.message for d in found)


def test_gpt2_fused_qkv_against_head_count(tmp_path):
    folder = write_checkpoint(tmp_path / "g", "gpt2", config_changes={"n_embd": 12, "n_head": 3})
    found = diagnoses_of(folder)
    assert "ATT-E331" in codes(found)
    assert any("n_embd 12" in d.message for d in found)


def test_shape_checked_even_without_the_consistency_pass(tmp_path):
    folder = write_checkpoint(tmp_path / "l", "llama", config_changes={"num_key_value_heads": 2})
    weights = load_model(folder, check=False).weights
    with pytest.raises(InputError) as e:
        weights.layer(0)
    assert e.value.diagnosis.code == "ATT-E331"


def test_tied_but_different(tmp_path):
    def head(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1
    (found,) = diagnoses_of(write_checkpoint(tmp_path / "g", "gpt2", edit=head))
    assert found.code == "ATT-E332" and "differs" in found.message

    def same_head(t):
        t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    assert diagnoses_of(write_checkpoint(tmp_path / "g2", "gpt2", edit=same_head)) == []


def test_untied_without_lm_head(tmp_path):
    def drop(t):
        del t["lm_head.weight"]
    (found,) = diagnoses_of(write_checkpoint(tmp_path / "l", "llama", edit=drop))
    assert found.code == "ATT-E332" and "LlamaForCausalLM" in found.message
    base = write_checkpoint(tmp_path / "base", "llama", edit=drop, config_changes={"architectures": ["LlamaModel"]})
    (found,) = diagnoses_of(base)
    assert found.code == "ATT-W302" and found.severity == "warning"
    assert load_model(base).weights.unembed is None


def test_missing_weight_and_non_float(tmp_path):
    def damage(t):
        del t["model.layers.0.mlp.up_proj.weight"]
        t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"].astype(np.int8)
    found = diagnoses_of(write_checkpoint(tmp_path / "l", "llama", edit=damage))
    assert codes(found) == ["ATT-E328", "ATT-E334"]
    assert found[0].message == "W_up is missing in layer 0"
    assert "q_proj" in full_text(found[1]) and "I8" in found[1].message


def test_errors_come_together(tmp_path):
    def damage(t):
        del t["encoder.layer.0.attention.self.value.bias"]
        t["stray"] = np.zeros(2, np.float32)
    with pytest.raises(InputError) as e:
        load_model(write_checkpoint(tmp_path / "b", "bert", edit=damage))
    assert codes(e.value.diagnoses) == ["ATT-E329", "ATT-E330"]


def test_config_of_another_family(tmp_path):
    folder = write_checkpoint(tmp_path / "x", "bert")
    (folder / "config.json").write_text((tmp_path / "x" / "config.json").read_text()
                                        .replace('"model_type": "bert"', '"model_type": "gpt2", "n_embd": 8, '
                                                 '"n_head": 2, "n_layer": 2'))
    with pytest.raises(InputError) as e:
        load_model(folder)
    assert e.value.diagnosis.code == "ATT-E328" and "wte.weight" in full_text(e.value.diagnosis)
