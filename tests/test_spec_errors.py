"""Bad input never shows a traceback: a code, a message, the YAML path and line, exit 2."""
import json

import numpy as np
import pytest

GOOD_ATTENTION = "attention: {heads: 1, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n"

# (name, spec text, error code, a fragment of the message, the line it must point at)
CASES = [
    ("syntax", "version: 1\ntokens: [A, B\n", "ATT-E001", "YAML syntax error", None),
    ("unknown key", "version: 1\ntokens: [A]\nembedings: [[1, 2]]\n", "ATT-E002", "did you mean 'embeddings'", 3),
    ("unknown attention key", "version: 1\ntokens: [A]\nembeddings: [[1, 2]]\n"
     "attention: {heads: 1, Wq: [[1]], W_k: [[1]], W_v: [[1]]}\n", "ATT-E002", "did you mean 'W_q'", 4),
    ("ragged", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3]]\n" + GOOD_ATTENTION,
     "ATT-E004", "ragged list", 3),
    ("text in matrix", "version: 1\ntokens: [A, B]\nembeddings:\n  - [1, 2]\n  - [3, x]\n" + GOOD_ATTENTION,
     "ATT-E005", "expected a number, got the text 'x'", 5),
    ("nan", "version: 1\ntokens: [A, B]\nembeddings: [[1, .nan], [3, 4]]\n" + GOOD_ATTENTION,
     "ATT-E006", "NaN at index [0, 1]", 3),
    ("inf", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, .inf]]\n" + GOOD_ATTENTION,
     "ATT-E006", "inf at index [1, 1]", 3),
    ("boolean in matrix", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, yes]]\n" + GOOD_ATTENTION,
     "ATT-E005", "got true", 3),
    ("heads not a number", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, 4]]\n"
     "attention: {heads: two, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n",
     "ATT-E003", "heads must be a whole number", 4),
    ("zero heads", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, 4]]\n"
     "attention: {heads: 0, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n",
     "ATT-E003", "≥ 1", 4),
    ("missing W_v", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, 4]]\n"
     "attention: {heads: 1, W_q: [[1], [1]], W_k: [[1], [1]]}\n", "ATT-E002", "needs `W_v:`", 4),
    ("missing attention", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, 4]]\n",
     "ATT-E002", "needs `attention:`", None),
    ("top level list", "- 1\n- 2\n", "ATT-E003", "must be a mapping", None),
    ("comments only", "# nothing here\n", "ATT-E008", "empty", None),
    ("newer version", "version: 7\ntokens: [A]\nembeddings: [[1]]\n" + GOOD_ATTENTION,
     "ATT-E009", "version 7", 1),
    ("python object tag", "version: 1\ntokens: !!python/object/apply:os.system [echo hi]\n",
     "ATT-E011", "not allowed", 2),
    ("duplicate key", "version: 1\ntokens: [A]\ntokens: [B]\n", "ATT-E012", "appears twice", 3),
    ("missing npy", "version: 1\ntokens: [A, B]\nembeddings: {npy: nowhere.npy}\n" + GOOD_ATTENTION,
     "ATT-E007", "file not found", 3),
    ("bad source key", "version: 1\ntokens: [A, B]\nembeddings: {npz: x.npz}\n" + GOOD_ATTENTION,
     "ATT-E007", "file not found", 3),
    ("unknown source", "version: 1\ntokens: [A, B]\nembeddings: {nyp: x.npy}\n" + GOOD_ATTENTION,
     "ATT-E002", "'npy'", 3),
    ("random impossible size", "version: 1\ntokens: [A, B]\n"
     "embeddings: {random: {shape: [100000, 100000, 1000]}}\n" + GOOD_ATTENTION,
     "ATT-E010", "impossibly large", 3),
    ("random negative", "version: 1\ntokens: [A, B]\nembeddings: {random: {shape: [2, -1]}}\n" + GOOD_ATTENTION,
     "ATT-E003", "positive whole numbers", 3),
    ("bad scale", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, 4]]\n"
     "attention: {heads: 1, scale: -2, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n",
     "ATT-E003", "scale must be", 4),
    ("bad mask word", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, 4]]\n"
     "attention: {heads: 1, mask: casual, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n",
     "ATT-E003", "did you mean 'causal'", 4),
    ("bad layout", "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, 4]]\n"
     "attention: {heads: 1, layout: torch, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n",
     "ATT-E003", "layout must be x_at_w or linear", 4),
    ("empty tokens", "version: 1\ntokens: []\nembeddings: [[1, 2]]\n" + GOOD_ATTENTION,
     "ATT-E010", "tokens is empty", 2),
    ("empty matrix", "version: 1\ntokens: [A]\nembeddings: [[]]\n" + GOOD_ATTENTION,
     "ATT-E010", "empty", 3),
]


@pytest.mark.parametrize("name,text,code,fragment,line", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_a_clear_message(invoke, write_spec, name, text, code, fragment, line):
    path = write_spec(text)
    exit_code, output = invoke("run", path)
    assert exit_code == 2, output
    assert code in output
    assert fragment in output.replace("\n", " ").replace("│", " ") or fragment in " ".join(output.split())
    if line is not None:
        assert f"spec.yaml:{line}" in output, output


@pytest.mark.parametrize("name,text,code,fragment,line", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_bad_spec_json_twin(invoke, write_spec, name, text, code, fragment, line):
    exit_code, output = invoke("run", write_spec(text), "--format", "json")
    assert exit_code == 2
    document = json.loads(output)
    assert document["exit_code"] == 2
    diagnosis = document["diagnoses"][0]
    assert diagnosis["code"] == code and diagnosis["severity"] == "error"
    if line is not None:
        assert diagnosis["locations"][0]["line"] == line


def test_missing_spec_file(invoke, tmp_path):
    exit_code, output = invoke("run", tmp_path / "absent.yaml")
    assert exit_code == 2 and "ATT-E007" in output and "not found" in output


def test_spec_is_a_directory(invoke, tmp_path):
    exit_code, output = invoke("run", tmp_path)
    assert exit_code == 2


def test_binary_file(invoke, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    exit_code, output = invoke("run", path)
    assert exit_code == 2 and "ATT-E001" in output and "UTF-8" in output


def test_pickled_npy_is_refused(invoke, write_spec, tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    path = write_spec("version: 1\ntokens: [A, B]\nembeddings: {npy: objects.npy}\n" + GOOD_ATTENTION)
    exit_code, output = invoke("run", path)
    assert exit_code == 2 and "ATT-E011" in output and "pickle" in output


def test_corrupt_npy(invoke, write_spec, tmp_path):
    (tmp_path / "broken.npy").write_bytes(b"not an npy file")
    path = write_spec("version: 1\ntokens: [A, B]\nembeddings: {npy: broken.npy}\n" + GOOD_ATTENTION)
    exit_code, output = invoke("run", path)
    assert exit_code == 2 and "ATT-E013" in output


def test_npz_missing_key_suggests(invoke, write_spec, tmp_path):
    np.savez(tmp_path / "weights.npz", embeddings=np.ones((2, 2)))
    path = write_spec("version: 1\ntokens: [A, B]\nembeddings: {npz: weights.npz, key: embedding}\n"
                      + GOOD_ATTENTION)
    exit_code, output = invoke("run", path)
    assert exit_code == 2 and "did you mean 'embeddings'" in output


def test_string_array_npy_refused(invoke, write_spec, tmp_path):
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    path = write_spec("version: 1\ntokens: [A, B]\nembeddings: {npy: words.npy}\n" + GOOD_ATTENTION)
    exit_code, output = invoke("run", path)
    assert exit_code == 2 and "ATT-E005" in output


def test_array_sources_are_relative_to_the_spec(invoke, tmp_path):
    folder = tmp_path / "deep" / "er"
    folder.mkdir(parents=True)
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.save(folder / "x.npy", x)
    np.savez(folder / "w.npz", q=np.array([[1.0], [0.0]]))
    (folder / "spec.yaml").write_text(
        "version: 1\ntokens: [A, B]\nembeddings: {npy: x.npy}\n"
        "attention: {heads: 1, W_q: {npz: w.npz, key: q}, W_k: {npz: w.npz, key: q}, W_v: {identity: 2}, "
        "scale: none}\n")
    import attntrace
    trace = attntrace.run(attntrace.load_spec(folder / "spec.yaml"))
    # Q = X @ [[1],[0]] = first column of X
    np.testing.assert_array_equal(trace.hand_view("Q"), x[:, :1])


def test_tokens_keep_their_text(write_spec):
    """YAML reads `no` as False and `1.0` as a number; tokens stay as written."""
    import attntrace
    spec = attntrace.load_spec(write_spec(
        "version: 1\ntokens: [yes, no, 1.0]\nembeddings: [[1], [2], [3]]\n"
        "attention: {heads: 1, W_q: [[1]], W_k: [[1]], W_v: [[1]]}\n"))
    assert spec.tokens == ["yes", "no", "1.0"]


def test_tokens_as_a_string(write_spec):
    import attntrace
    spec = attntrace.load_spec(write_spec(
        'version: 1\ntokens: "猫 抓 了 老鼠"\nembeddings: {random: {shape: [4, 2]}}\n'
        "attention: {heads: 1, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n"))
    assert spec.tokens == ["猫", "抓", "了", "老鼠"]


def test_embedding_table_unknown_token(invoke, write_spec):
    path = write_spec("version: 1\ntokens: [king, quen]\nembeddings: {king: [1, 0], queen: [0, 1]}\n"
                      + GOOD_ATTENTION)
    exit_code, output = invoke("run", path)
    assert exit_code == 2 and "did you mean 'queen'" in output and "spec.yaml:2" in output


def test_python_api_raises_typed_errors(write_spec):
    import attntrace
    from attntrace.errors import InputError
    with pytest.raises(InputError) as info:
        attntrace.load_spec(write_spec("version: 1\ntokens: [A]\nembedings: [[1]]\n"))
    assert info.value.diagnosis.code == "ATT-E002"
    assert info.value.diagnosis.locations[0].line == 3


def test_yaml_is_loaded_safely_no_code_runs(write_spec, tmp_path):
    marker = tmp_path / "pwned"
    path = write_spec(f"version: 1\nname: !!python/object/apply:os.system ['touch {marker}']\n")
    import attntrace
    from attntrace.errors import InputError
    with pytest.raises(InputError):
        attntrace.load_spec(path)
    assert not marker.exists()
