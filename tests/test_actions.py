"""Built-in hook actions (--hook HOOK:ACTION[=ARG], the spec's hooks:) and --hook-file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import attntrace
from attntrace.cli.main import cli

# seed 002's A, B, C: Q·Kᵀ = [[10, 58, 106], [58, 234, 410], [106, 410, 714]], V rows [2, 4], [10, 12], [18, 20]
X = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
W_Q = [[1, 0], [1, 0], [0, 1], [0, 1]]
W_K = [[0, 1], [0, 1], [1, 0], [1, 0]]
W_V = [[1, 0], [0, 1], [1, 0], [0, 1]]
QK = [[10, 58, 106], [58, 234, 410], [106, 410, 714]]
V = [[2, 4], [10, 12], [18, 20]]
MEAN_V = [(2 + 10 + 18) / 3, (4 + 12 + 20) / 3]


def abc(**extra):
    return dict({"version": 1, "tokens": ["A", "B", "C"], "embeddings": X,
                 "attention": {"heads": 1, "W_q": W_Q, "W_k": W_K, "W_v": W_V}}, **extra)


def two_heads(**extra):
    eye = np.eye(4).tolist()
    return dict({"version": 1, "tokens": ["p", "q", "r"], "embeddings": [[1, 0, 2, 0], [0, 1, 0, 3], [1, 1, 1, 1]],
                 "attention": {"heads": 2, "W_q": eye, "W_k": eye, "W_v": eye}}, **extra)


@pytest.fixture
def spec_file(tmp_path):
    def write(data, name="spec.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        return path
    return write


def run_cli(*args, cwd=None):
    runner = CliRunner()
    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def error_of(*args):
    """Run the CLI with --format json and return (exit code, the first diagnosis as one line of text)."""
    result = run_cli(*args, "--format", "json")
    d = json.loads(result.stdout)["diagnoses"][0]
    return result.exit_code, " ".join(str(d[k]) for k in ("code", "message", "hint") if d.get(k))


def json_run(path, *hooks):
    args = ["run", path, "--format", "json"]
    for hook in hooks:
        args += ["--hook", hook]
    result = run_cli(*args)
    return result, json.loads(result.stdout)


def step_values(doc, hook):
    return np.array(doc["hooks"][hook]["values"], dtype=float)


def softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


# --------------------------------------------------------------------------- each action

def test_scale_and_zero(spec_file):
    path = spec_file(abc())
    result, doc = json_run(path, "attn.hook_z:scale=0.5")
    assert result.exit_code == 0
    clean = attntrace.run(abc(), keep="all")
    np.testing.assert_allclose(step_values(doc, "hook_attn_out"), 0.5 * clean["output"])
    result, doc = json_run(path, "V:zero")
    np.testing.assert_array_equal(step_values(doc, "hook_attn_out"), np.zeros((1, 3, 2)))


def test_clamp_changes_the_softmax_that_follows(spec_file):
    result, doc = json_run(spec_file(abc()), "scores:clamp=,100")
    assert result.exit_code == 0
    clamped = [[min(v, 100) for v in row] for row in QK]
    np.testing.assert_array_equal(step_values(doc, "attn.hook_qk")[0, 0], clamped)
    weights = step_values(doc, "attn.hook_pattern")[0, 0]
    for i, row in enumerate(clamped):
        np.testing.assert_allclose(weights[i], softmax([v / math.sqrt(2) for v in row]), rtol=1e-12)


def test_ablate_head_zeroes_that_head_only(spec_file):
    path = spec_file(two_heads())
    result, doc = json_run(path, "attn.hook_pattern:ablate-head=1")
    assert result.exit_code == 0
    clean = attntrace.run(two_heads(), keep="all")
    out = step_values(doc, "hook_attn_out")[0]
    # no W_o: output = [z head 0 | z head 1], each d_head = 2 columns
    np.testing.assert_allclose(out[:, :2], clean["output"][0, :, :2])
    np.testing.assert_array_equal(out[:, 2:], np.zeros((3, 2)))
    np.testing.assert_array_equal(step_values(doc, "attn.hook_pattern")[0, 1], np.zeros((3, 3)))


def test_ablate_several_heads_with_alias(spec_file):
    result, doc = json_run(spec_file(two_heads()), "z:zero-head=0,1")
    assert result.exit_code == 0
    np.testing.assert_array_equal(step_values(doc, "hook_attn_out"), np.zeros((1, 3, 4)))


def test_save_collects_hooks_into_one_npz(spec_file, tmp_path):
    target = tmp_path / "acts.npz"
    result, _ = json_run(spec_file(abc()), f"scores:save={target}", f"V:save={target}")
    assert result.exit_code == 0
    with np.load(target, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["attn.hook_qk", "attn.hook_v"]
        np.testing.assert_array_equal(saved["attn.hook_qk"][0, 0], QK)
        np.testing.assert_array_equal(saved["attn.hook_v"][0, :, 0], V)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_refuses_an_input_file(tmp_path, spec_file):
    np.savez(tmp_path / "w.npz", W_q=np.array(W_Q, dtype=float))
    data = abc()
    data["attention"]["W_q"] = {"npz": "w.npz", "key": "W_q"}
    path = spec_file(data)
    before = (tmp_path / "w.npz").read_bytes()
    code, message = error_of("run", path, "--hook", f"Q:save={tmp_path / 'w.npz'}")
    assert code == 2 and "ATT-E064" in message and "input of this run" in message
    assert (tmp_path / "w.npz").read_bytes() == before


def test_patch_from_npy_and_npz(spec_file, tmp_path):
    path = spec_file(abc())
    np.save(tmp_path / "uniform.npy", np.full((3, 3), 1 / 3))        # written without batch/head axes
    result, doc = json_run(path, f"weights:patch={tmp_path / 'uniform.npy'}")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(step_values(doc, "hook_attn_out")[0], [MEAN_V] * 3)
    # npz: the key defaults to the hook name; or name it after a colon
    np.savez(tmp_path / "acts.npz", **{"attn.hook_pattern": np.full((1, 1, 3, 3), 1 / 3), "other": np.eye(3)})
    result, doc = json_run(path, f"weights:patch={tmp_path / 'acts.npz'}")
    np.testing.assert_allclose(step_values(doc, "hook_attn_out")[0], [MEAN_V] * 3)
    one_hot_a = np.eye(3)        # row i attends to token i: output row i = V row i
    result, doc = json_run(path, f"weights:patch={tmp_path / 'acts.npz'}:other")
    np.testing.assert_allclose(step_values(doc, "hook_attn_out")[0], one_hot_a @ np.array(V))


def test_patch_errors(spec_file, tmp_path):
    path = spec_file(abc())
    np.save(tmp_path / "small.npy", np.ones((2, 2)))
    code, text = error_of("run", path, "--hook", f"weights:patch={tmp_path / 'small.npy'}")
    assert code == 2
    assert "ATT-E062" in text and "attn.hook_pattern" in text and "(2, 2)" in text
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, text = error_of("run", path, "--hook", f"weights:patch={tmp_path / 'objects.npy'}")
    assert code == 2 and "without pickle" in text
    np.savez(tmp_path / "two.npz", a=np.ones(3), b=np.ones(3))
    code, text = error_of("run", path, "--hook", f"weights:patch={tmp_path / 'two.npz'}")
    assert code == 2 and "patch=two.npz:KEY" in text
    code, text = error_of("run", path, "--hook", f"weights:patch={tmp_path / 'nope.npy'}")
    assert code == 2 and "ATT-E007" in text


def test_print_goes_to_stdout_or_stderr_under_json(spec_file):
    path = spec_file(abc())
    result = run_cli("run", path, "--hook", "scores:print", "--steps", "output")
    assert result.exit_code == 0
    assert "── attn.hook_qk (batch=1, n_heads=1, seq_q=3, seq_k=3) ──" in result.stdout
    assert "410." in result.stdout and "hooks: scores:print" in result.stdout
    result = run_cli("run", path, "--hook", "scores:print", "--format", "json")
    json.loads(result.stdout)                      # stdout is still one JSON document
    assert "attn.hook_qk" in result.stderr


def test_mask_refuses_arithmetic(spec_file):
    data = abc()
    data["attention"]["mask"] = "causal"
    code, text = error_of("run", spec_file(data), "--hook", "mask:scale=2")
    assert code == 2 and "True/False mask" in text


@pytest.mark.parametrize("text, code, words", [
    ("attn.hook_q", "ATT-E060", "HOOK:ACTION[=ARG]"),
    ("attn.hook_q:", "ATT-E060", "HOOK:ACTION[=ARG]"),
    ("attn.hook_q:scale", "ATT-E060", "scale needs an argument"),
    ("attn.hook_q:zero=3", "ATT-E060", "takes no argument"),
    ("attn.hook_q:scael=2", "ATT-E060", "did you mean 'scale'?"),
    ("attn.hook_q:scale=abc", "ATT-E061", "finite number"),
    ("attn.hook_q:clamp=5,1", "ATT-E061", "reversed"),
    ("attn.hook_q:clamp=5", "ATT-E061", "LOW,HIGH"),
    ("hook_embed:ablate-head=0", "ATT-E061", "has no head axis"),
    ("weights:ablate-head=x", "ATT-E061", "head numbers"),
    ("weights:ablate-head=4", "ATT-E061", "head 4 does not exist"),
    ("weights:patch=file.txt", "ATT-E061", ".npy or .npz"),
    ("weights:save=out.txt", "ATT-E061", ".npz"),
    ("attn.hook_qq:zero", "ATT-E015", "did you mean"),
])
def test_bad_hook_actions_exit_2(spec_file, text, code, words):
    status, message = error_of("run", spec_file(abc()), "--hook", text)
    assert status == 2, message
    assert code in message and words in message and text in message
    result = run_cli("run", spec_file(abc()), "--hook", text)     # the rich form: a panel, no traceback
    assert result.exit_code == 2 and code in result.output


# --------------------------------------------------------------------------- --hook-file

def write_hooks(tmp_path, text, name="my_hooks.py"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_hook_file_list_and_dict(spec_file, tmp_path):
    path = spec_file(abc())
    hooks = write_hooks(tmp_path, "import numpy as np\n"
                                  "def flatten(pattern, *, hook):\n"
                                  "    return np.full_like(pattern, 1 / pattern.shape[-1])\n"
                                  "HOOKS = [('attn.hook_pattern', flatten)]\n")
    result = run_cli("run", path, "--hook-file", hooks, "--format", "json")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(step_values(json.loads(result.stdout), "hook_attn_out")[0], [MEAN_V] * 3)
    hooks = write_hooks(tmp_path, "HOOKS = {'V': lambda v, *, hook: v * 0}\n", "dict_hooks.py")
    result = run_cli("run", path, "--hook-file", hooks, "--format", "json")
    np.testing.assert_array_equal(step_values(json.loads(result.stdout), "hook_attn_out"), np.zeros((1, 3, 2)))


@pytest.mark.parametrize("text, words", [
    ("x = 1\n", "defines no HOOKS"),
    ("def broken(:\n", "line 1: syntax error"),
    ("import numpy\nraise RuntimeError('boom')\n", "RuntimeError: boom (line 2)"),
    ("HOOKS = [('weights',)]\n", "not a (hook name, function) pair"),
    ("HOOKS = [('weights', 3)]\n", "not a function"),
    ("HOOKS = [('weigths', lambda a, *, hook: None)]\n", "did you mean"),
    ("def bad(a, *, hook):\n    return a.nonexistent\nHOOKS = [('weights', bad)]\n",
     "hook 'bad' from my_hooks.py raised AttributeError"),
])
def test_hook_file_errors_are_messages(spec_file, tmp_path, text, words):
    code, message = error_of("run", spec_file(abc()), "--hook-file", write_hooks(tmp_path, text))
    assert code == 2, message
    assert words in message


def test_hook_file_must_be_python(spec_file, tmp_path):
    code, message = error_of("run", spec_file(abc()), "--hook-file", write_hooks(tmp_path, "x", "hooks.txt"))
    assert code == 2 and "Python file" in message


# --------------------------------------------------------------------------- the spec's hooks: list

def test_spec_hooks_strings_and_mappings(spec_file, tmp_path):
    np.save(tmp_path / "eye.npy", np.eye(3))              # relative to the spec's folder
    path = spec_file(abc(hooks=["weights:patch=eye.npy", {"hook": "output", "clamp": [None, 15]}]))
    result, doc = json_run(path)
    assert result.exit_code == 0, result.output
    # identity weights: output = V, then clamped at 15
    np.testing.assert_array_equal(step_values(doc, "hook_attn_out")[0], np.minimum(np.array(V), 15))


def test_spec_hook_mapping_needs_one_action(spec_file):
    code, message = error_of("run", spec_file(abc(hooks=[{"hook": "output", "scale": 2, "clamp": "0,1"}])))
    assert code == 2 and "exactly one action" in message and "hooks[0]" in message
