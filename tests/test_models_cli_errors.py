"""Silent mistakes made loud, end to end: a broken checkpoint never gives a trace.

Each broken checkpoint (written with numpy by ``model_checkpoints.write_checkpoint``, names as
transformers saves them) goes through every way a user reaches a model:

* the Python API, ``attntrace.run({"model": FOLDER, "ids": ...})``: an ``InputError`` whose
  diagnoses carry the code;
* ``attntrace run --model FOLDER --ids ... --format json``: exit 2, the code in the JSON
  document, and no steps;
* ``attntrace run spec.yaml`` with ``model:`` in the spec: exit 2 and the code in the text;
* ``attntrace import-model FOLDER -o spec.yaml``: exit 2 and nothing written.

The loader's own tests (test_models_families.py) check the messages in detail; here the point
is that no entry point turns the error into a silent exit 0.  torch is not needed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_checkpoints import write_checkpoint  # noqa: E402

import attntrace  # noqa: E402
from attntrace.errors import InputError  # noqa: E402

IDS = "1,2,3"


def _drop(name):
    def edit(tensors):
        del tensors[name]
    return edit


def _add(name, shape):
    def edit(tensors):
        tensors[name] = np.ones(shape, np.float32)
    return edit


def _untied_head(tensors):
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0


# case -> (family, config.json changes, tensor edit, the code, words the message must hold)
BROKEN = {
    "missing bias": ("bert", None, _drop("encoder.layer.1.attention.self.query.bias"), "ATT-E330",
                     ["b_q", "layer 1"]),
    "config promises biases": ("llama", {"attention_bias": True}, None, "ATT-E330", ["b_q"]),
    "unused weight": ("bert", None, _add("encoder.layer.0.attention.self.extra.weight", (8, 8)), "ATT-E329",
                      ["encoder.layer.0.attention.self.extra.weight"]),
    "layer beyond the config": ("llama", {"num_hidden_layers": 1}, None, "ATT-E329", ["layer 1"]),
    "wrong head count": ("llama", {"num_attention_heads": 4}, None, "ATT-E331",
                         ["num_attention_heads 4", "W_q"]),
    "wrong kv head count": ("llama", {"num_key_value_heads": 2}, None, "ATT-E331", ["num_key_value_heads 2"]),
    "heads do not divide d_model": ("bert", {"num_attention_heads": 3}, None, "ATT-E323",
                                    ["not divisible by num_attention_heads 3"]),
    "tied but the head differs": ("gpt2", None, _untied_head, "ATT-E332", ["differs"]),
    "tied in config, separate head": ("llama", {"tie_word_embeddings": True}, None, "ATT-E332",
                                      ["tie_word_embeddings is true"]),
    "untied without a head": ("llama", None, _drop("lm_head.weight"), "ATT-E332", ["LlamaForCausalLM"]),
    "unsupported model_type": ("bert", {"model_type": "t5"}, None, "ATT-E321",
                               ["'t5'", "bert, gpt2, llama, mistral, qwen2"]),
    "missing weight": ("llama", None, _drop("model.layers.0.mlp.up_proj.weight"), "ATT-E328", ["W_up", "layer 0"]),
}


@pytest.fixture(params=list(BROKEN), ids=lambda case: case.replace(" ", "-"))
def broken(request, tmp_path):
    family, config, edit, code, words = BROKEN[request.param]
    folder = write_checkpoint(tmp_path / "checkpoint", family, config_changes=config, edit=edit)
    return folder, code, words


def _text(diagnosis):
    return " ".join([diagnosis.message, diagnosis.hint or "", *diagnosis.details])


def test_api_raises_the_code(broken):
    folder, code, words = broken
    with pytest.raises(InputError) as caught:
        attntrace.run({"model": str(folder), "ids": [[1, 2, 3]]})
    errors = [d for d in caught.value.diagnoses if d.severity == "error"]
    assert code in [d.code for d in errors], [d.code for d in errors]
    named = " ".join(_text(d) for d in errors if d.code == code)
    assert all(w in named for w in words), named


def test_cli_model_flag_exits_2_with_the_code_and_no_steps(broken, invoke):
    folder, code, _ = broken
    exit_code, out = invoke("run", "--model", folder, "--ids", IDS, "--format", "json")
    assert exit_code == 2, out
    doc = json.loads(out)
    assert code in [d["code"] for d in doc["diagnoses"]] and not doc.get("steps")


def test_cli_spec_with_model_exits_2_with_the_code(broken, invoke, write_spec):
    folder, code, _ = broken
    spec = write_spec(f"model: {folder.name}\nids: [[1, 2, 3]]\n")        # relative to the spec's folder
    exit_code, out = invoke("run", spec)
    assert exit_code == 2 and code in out, out
    assert "Traceback" not in out


def test_import_model_exits_2_and_writes_nothing(broken, invoke, tmp_path):
    folder, code, _ = broken
    target = tmp_path / "out" / "spec.yaml"
    target.parent.mkdir()
    exit_code, out = invoke("import-model", folder, "--ids", IDS, "-o", target)
    assert exit_code == 2 and code in out, out
    assert list(target.parent.iterdir()) == []


def test_the_checkpoints_are_broken_only_where_meant(tmp_path):
    """The same checkpoints unbroken trace fine: each error above comes from the one change made."""
    for family in ("bert", "gpt2", "llama"):
        trace = attntrace.run({"model": str(write_checkpoint(tmp_path / family, family)), "ids": [[1, 2, 3]]})
        assert not [d for d in trace.diagnoses if d.severity == "error"]
        assert trace["blocks.1.attn.hook_pattern"].shape[-2:] == (3, 3)


@pytest.mark.parametrize("case, spec, code", [
    ("no checkpoint there", {"model": "no-such-checkpoint-folder", "ids": [[1, 2]]}, "ATT-E315"),
    ("id outside the vocabulary", {"ids": [[1, 20]]}, "ATT-E337"),
    ("longer than the position table", {"ids": [list(range(1, 18))]}, "ATT-E339"),
    ("a layer the model lacks", {"ids": [[1, 2]], "layers": "0-2"}, "ATT-E333"),
    ("text without a tokenizer", {"text": "hello"}, "ATT-E336"),
], ids=lambda v: v.replace(" ", "-") if isinstance(v, str) else None)
def test_bad_requests_on_a_good_checkpoint(tmp_path, case, spec, code):
    folder = write_checkpoint(tmp_path / "bert", "bert")           # vocab 20, 16 positions, 2 layers, no tokenizer
    with pytest.raises(InputError) as caught:
        attntrace.run({"model": str(folder), **spec})
    assert code in [d.code for d in caught.value.diagnoses], case
