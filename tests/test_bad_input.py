"""Bad input never breaks attntrace (issue 10): each reproduction of the issue, as a test.

Every case is an input a hostile or careless user can write.  None may end in
ATT-E999 (an internal error, exit 70), a traceback, a hang, or a wrong answer
with exit 0; each is refused where the value enters, with its own code.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ABC, ROOT

from attntrace.errors import InputError

ABC_TEXT = yaml.safe_dump(ABC)
ATTENTION = "attention: {heads: 1, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n"


def codes(output: str) -> list:
    import re
    return re.findall(r"ATT-[EWI]\d{3}", output)


def json_documents(text: str) -> list:
    """Every JSON document in a stream (a second one after the first is a bug)."""
    decoder, documents, position = json.JSONDecoder(), [], 0
    text = text.strip()
    while position < len(text):
        document, end = decoder.raw_decode(text, position)
        documents.append(document)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return documents


def refused(invoke, path, code, *args):
    """Run the spec; it must be refused with `code` (exit 2), as one JSON document under --format json."""
    exit_code, output = invoke("run", path, *args)
    assert exit_code == 2 and code in codes(output) and "ATT-E999" not in output, output
    exit_code, output = invoke("run", path, "--format", "json", *args)
    documents = json_documents(output)
    assert exit_code == 2 and len(documents) == 1, output
    assert documents[0]["diagnoses"][0]["code"] == code
    return documents[0]["diagnoses"][0]


def scales_spec(scale, heads=3):
    """Three random heads with a given scale (1e308 overflows Q·Kᵀ·scale)."""
    width = 2 * heads
    return {"version": 1, "tokens": ["a", "b", "c", "d"],
            "embeddings": {"random": {"shape": [4, 6], "seed": 0}},
            "attention": {"heads": heads, "scale": scale,
                          **{w: {"random": {"shape": [6, width], "seed": i}} for i, w in
                             enumerate(("W_q", "W_k", "W_v"), start=1)}}}


# --------------------------------------------------------------------------- numbers

def test_a_5000_digit_integer_is_refused_where_yaml_reads_it(invoke, write_spec):
    path = write_spec(ABC_TEXT.replace("heads: 1", "heads: " + "9" * 5000))
    diagnosis = refused(invoke, path, "ATT-E019")
    assert diagnosis["locations"][0]["line"] is not None and "5,000 characters" in diagnosis["message"]


def test_a_5000_digit_integer_in_the_description_is_refused_too(invoke, write_spec):
    refused(invoke, write_spec(ABC_TEXT + "description: " + "9" * 5000 + "\n"), "ATT-E019")


def test_a_401_digit_integer_in_a_matrix(invoke, write_spec):
    text = "version: 1\ntokens: [A, B]\nembeddings: [[1, 2], [3, " + "9" * 401 + "]]\n" + ATTENTION
    assert refused(invoke, write_spec(text), "ATT-E019")["locations"][0]["line"] == 3


def test_numbers_are_read_as_pyyaml_reads_them():
    """The fast path for floats (float() first) gives what PyYAML's safe constructor gives."""
    from attntrace.inputs import yamlload
    text = "[1_000.5, -1e9, 1.0e+3, 2.5E-3, .inf, -.Inf, 1:30.0, 1.0e+400, 0.1, -0.0, 1]"
    mine, theirs = yamlload.load_text("a: " + text).data["a"], yaml.safe_load(text)
    theirs[1] = -1e9                             # YAML 1.1 reads -1e9 as text; attntrace reads it as YAML 1.2 does
    assert [(type(v), v) for v in mine] == [(type(v), v) for v in theirs]
    assert str(mine[9]) == "-0.0"


def test_scale_as_a_400_digit_integer(invoke, write_spec):
    refused(invoke, write_spec(ABC_TEXT.replace("heads: 1", "heads: 1\n  scale: " + "9" * 400)), "ATT-E019")


@pytest.mark.parametrize("where", ["heads", "scale", "matrix", "tolerance", "hook"])
def test_huge_integers_from_the_api_are_input_errors(where):
    import attntrace
    spec = json.loads(json.dumps(ABC))
    huge = 10 ** 5000
    if where == "matrix":
        spec["embeddings"][0][0] = huge
    elif where == "tolerance":
        spec["expect"] = {"atol": huge, "weights": {"cell": [0, 0], "value": 1}}
    elif where == "hook":
        spec["hooks"] = [{"hook": "attn.hook_pattern", "ablate-head": huge}]
    else:
        spec["attention"][where] = huge
    with pytest.raises(InputError) as error:
        attntrace.run(spec)
    assert error.value.diagnosis.code in ("ATT-E003", "ATT-E019", "ATT-E061")


@pytest.mark.parametrize("field, value", [("version", ".inf"), ("version", ".nan"), ("scale", ".nan"),
                                          ("scale", "-.inf"), ("scale", "1.0e+400")])
def test_non_finite_numbers_are_refused(invoke, write_spec, field, value):
    text = ABC_TEXT.replace("version: 1", f"version: {value}") if field == "version" else \
        ABC_TEXT.replace("heads: 1", f"heads: 1\n  {field}: {value}")
    refused(invoke, write_spec(text), "ATT-E003")


# --------------------------------------------------------------------------- array files

@pytest.fixture
def sidecar(tmp_path, write_spec):
    """A spec whose embeddings come from a file in its folder: sidecar(source_mapping_text) -> spec path."""
    def make(source: str):
        return write_spec("version: 1\ntokens: [A, B, C]\nembeddings: " + source + "\n"
                          "attention: {heads: 1, W_q: [[1], [1]], W_k: [[1], [1]], W_v: [[1], [1]]}\n")
    return make


def test_a_npy_file_given_as_npz(invoke, sidecar, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    diagnosis = refused(invoke, sidecar("{npz: x.npy, key: x}"), "ATT-E013")
    assert "npy" in diagnosis["hint"]


def test_a_npz_file_given_as_npy(invoke, sidecar, tmp_path):
    np.savez(tmp_path / "x.npz", x=np.ones((3, 2)))
    assert "npz" in refused(invoke, sidecar("{npy: x.npz}"), "ATT-E013")["hint"]


@pytest.mark.parametrize("content", [b"", b"PK\x05\x06" + b"\0" * 18, b"PK\x03\x04garbage"])
def test_empty_or_broken_npz(invoke, sidecar, tmp_path, content):
    (tmp_path / "x.npz").write_bytes(content)
    code = "ATT-E007" if content.startswith(b"PK\x05") else "ATT-E013"       # an empty archive holds no 'x'
    refused(invoke, sidecar("{npz: x.npz, key: x}"), code)


def test_every_truncation_of_a_npy_file_is_an_input_error(tmp_path):
    """Every prefix of a valid .npy (header and data) is a clean ATT-E013, never a tokenize error."""
    from attntrace.inputs.sources import SourceContext, load_array
    np.save(tmp_path / "full.npy", np.arange(6, dtype=np.float64).reshape(3, 2))
    raw = (tmp_path / "full.npy").read_bytes()
    ctx = SourceContext(tmp_path, lambda path: None)
    for length in range(len(raw)):
        (tmp_path / "cut.npy").write_bytes(raw[:length])
        with pytest.raises(InputError) as error:
            load_array({"npy": "cut.npy"}, ctx, ["embeddings"])
        assert error.value.diagnosis.code == "ATT-E013", (length, error.value)
    np.testing.assert_array_equal(load_array({"npy": "full.npy"}, ctx, []), np.arange(6.0).reshape(3, 2))


VALID_HEADER = "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }"


@pytest.mark.parametrize("header", [
    VALID_HEADER,                                                             # the control
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2)",               # unterminated: tokenize error
    "{'descr': '<f8', 'fortran_order': False, 'shape': (-3, 2), }",
    "{'descr': '<f8', 'fortran_order': 0, 'shape': (3, 2), }",
    "{'descr': 'not a dtype', 'fortran_order': False, 'shape': (3, 2), }",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (10**9,), }",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",), }",
    "[" * 5000 + "]" * 5000,
    "{'descr': '<f8', 'fortran_order': False, 'shape': (4000000000, 4000000000), }",
])
def test_hand_written_npy_headers(tmp_path, header):
    from attntrace.inputs.sources import SourceContext, load_array
    data = np.arange(6, dtype="<f8").tobytes()
    text = header.encode("latin1")
    raw = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data
    (tmp_path / "h.npy").write_bytes(raw)
    ctx = SourceContext(tmp_path, lambda path: None)
    if header == VALID_HEADER:
        np.testing.assert_array_equal(load_array({"npy": "h.npy"}, ctx, []), np.arange(6.0).reshape(3, 2))
        return
    with pytest.raises(InputError) as error:
        load_array({"npy": "h.npy"}, ctx, [])
    assert error.value.diagnosis.code in ("ATT-E013", "ATT-E010")


def test_fortran_order_and_big_endian_npy_load_their_values(tmp_path):
    from attntrace.inputs.sources import SourceContext, load_array
    values = np.arange(12.0).reshape(3, 4)
    np.save(tmp_path / "f.npy", np.asfortranarray(values))
    np.save(tmp_path / "b.npy", values.astype(">f8"))
    np.savez_compressed(tmp_path / "c.npz", w=values.astype(np.float32))
    ctx = SourceContext(tmp_path, lambda path: None)
    np.testing.assert_array_equal(load_array({"npy": "f.npy"}, ctx, []), values)
    np.testing.assert_array_equal(load_array({"npy": "b.npy"}, ctx, []), values)
    loaded = load_array({"npz": "c.npz", "key": "w"}, ctx, [])
    assert loaded.dtype == np.float32 and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, values)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="no /proc")
def test_proc_self_mem(invoke, sidecar):
    refused(invoke, sidecar("{npy: /proc/self/mem}"), "ATT-E007")


def test_a_device_or_folder_is_not_an_array_file(invoke, sidecar, tmp_path):
    (tmp_path / "folder.npy").mkdir()
    refused(invoke, sidecar("{npy: folder.npy}"), "ATT-E007")
    if Path("/dev/zero").exists():
        refused(invoke, sidecar("{npy: /dev/zero}"), "ATT-E007")


@pytest.mark.parametrize("options, code", [("{shape: [3, 2], std: -1}", "ATT-E003"),
                                           ("{shape: [3, 2], std: .nan}", "ATT-E003"),
                                           ("{shape: [3, 2], mean: .inf}", "ATT-E003"),
                                           ("{shape: [3, 2], seed: -1}", "ATT-E003"),
                                           ("{shape: [3, 2], seed: 1.5}", "ATT-E003")])
def test_random_sources_refuse_bad_parameters(invoke, sidecar, options, code):
    refused(invoke, sidecar("{random: " + options + "}"), code)


@pytest.mark.parametrize("std", ["0", "-0.0"])        # -0.0 passes `>= 0` but numpy refuses its sign bit
def test_random_std_zero_is_fine(invoke, sidecar, std):
    assert invoke("run", sidecar("{random: {shape: [3, 2], std: " + std + "}}"))[0] == 0


# --------------------------------------------------------------------------- YAML graphs

def test_a_self_referencing_alias(invoke, write_spec):
    diagnosis = refused(invoke, write_spec("version: 1\ntokens: &t [A, *t]\nembeddings: [[1, 2]]\n" + ATTENTION),
                        "ATT-E018")
    assert diagnosis["locations"][0]["line"] == 2


def test_a_self_referencing_spec_from_the_api():
    import attntrace
    tokens = ["A"]
    tokens.append(tokens)
    spec = dict(json.loads(json.dumps(ABC)), tokens=tokens)
    with pytest.raises(InputError) as error:
        attntrace.run(spec)
    assert error.value.diagnosis.code == "ATT-E018"
    with pytest.raises(InputError) as error:
        attntrace.load_spec_text("version: 1\ntokens: &t [A, *t]\n")
    assert error.value.diagnosis.code == "ATT-E018"


def test_shared_values_from_the_api_are_fine():
    import attntrace
    identity = [[1, 0], [0, 1]]
    spec = {"version": 1, "tokens": ["a", "b"], "embeddings": identity,
            "attention": {"heads": 1, "W_q": identity, "W_k": identity, "W_v": identity}}
    assert attntrace.run(spec).arrays["attn.hook_pattern"].shape == (1, 1, 2, 2)


def bomb(levels: int, width: int = 10, where: str = "description") -> str:
    """A "billion laughs" document: each anchor repeats the previous one `width` times."""
    lines = ["version: 1", f"{where}:", "  - &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    """10⁹ values from 9 lines: refused (ATT-E018), in a subprocess with a deadline, never a hang."""
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9) + "tokens: [A]\nembeddings: [[1]]\n" + ATTENTION.replace("[[1], [1]]", "[[1]]"))
    result = subprocess.run([sys.executable, "-m", "attntrace", "run", str(path), "--format", "json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert json.loads(result.stdout)["diagnoses"][0]["code"] == "ATT-E018"


def test_aliases_that_repeat_values_modestly_still_load():
    import attntrace
    text = bomb(3, where="description") + "tokens: [A]\nembeddings: [[1]]\n" + ATTENTION.replace("[[1], [1]]",
                                                                                                   "[[1]]")
    assert attntrace.load_spec_text(text).tokens == ["A"]


def test_the_duplicate_key_check_visits_each_node_once():
    """Aliases share nodes: a graph of 2⁴⁰ expanded nodes has 41 distinct ones, and 41 are visited."""
    from attntrace.inputs.yamlload import _Loader, distinct_nodes
    lines = ["a0: &a0 {k: 1}"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 41)]
    loader = _Loader("\n".join(lines) + "\n")
    root = loader.get_single_node()
    visited = [node for node, _ in distinct_nodes(root)]
    assert len(visited) == 42            # the root mapping, {k: 1}, and 40 lists


def test_nesting_deeper_than_the_budget(invoke, write_spec):
    refused(invoke, write_spec("version: 1\ndescription: " + "[" * 200 + "]" * 200 + "\n"), "ATT-E018")


def test_duplicate_keys_inside_an_anchored_mapping_are_still_found(invoke, write_spec):
    text = ABC_TEXT + "description: &d {x: 1, x: 2}\nname: *d\n"
    refused(invoke, write_spec(text), "ATT-E012")


# --------------------------------------------------------------------------- hook arguments

@pytest.mark.parametrize("hook", ["weights:print=-1", "weights:print=1.5", "weights:print=400",
                                  "weights:print=nan", "weights:ablate-head=" + "9" * 5000])
def test_bad_hook_arguments_in_a_spec(invoke, write_spec, hook):
    refused(invoke, write_spec(ABC_TEXT + f"hooks: ['{hook}']\n"), "ATT-E061")


def test_save_into_a_missing_folder_is_refused_before_the_run(invoke, spec_path):
    exit_code, output = invoke("run", spec_path, "--hook", "scores:save=/no/such/dir/s.npz")
    assert exit_code == 2 and codes(output) == ["ATT-E064"] and "does not exist" in output
    assert "Step 1/" not in output             # refused before anything ran or was shown


def test_save_into_a_folder_that_is_a_file(invoke, spec_path, tmp_path):
    (tmp_path / "file").write_text("x")
    exit_code, output = invoke("run", spec_path, "--hook", f"scores:save={tmp_path / 'file' / 's.npz'}")
    assert exit_code == 2 and "ATT-E064" in output


# --------------------------------------------------------------------------- exports

def test_exports_into_an_unwritable_folder_are_refused_before_the_run(invoke, spec_path, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked
                        else real_access(path, mode, **kw))
    exit_code, output = invoke("run", spec_path, "--export", locked / "t.svg", "--format", "json")
    documents = json_documents(output)
    assert exit_code == 2 and len(documents) == 1
    assert documents[0]["diagnoses"][0]["code"] == "ATT-E064" and "not writable" in output


# As root every folder is writable, so the child drops to nobody -- after a warm-up run (and a refused
# one) has loaded every module it needs: the checkout may sit in a folder nobody cannot read (mktemp -d).
AS_NOBODY = """
import contextlib, io, os, sys
from attntrace.cli.main import cli

def run(args):
    try:
        cli.main(args, prog_name="attntrace")
    except SystemExit as done:
        return done.code
    return 0

spec, warm, target = sys.argv[1:4]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    run(["run", spec, "--export", warm + "/t.svg", "--export", warm + "/t.npz", "--format", "json"])
    run(["run", spec, "--export", warm + "/no/such/folder/t.svg", "--format", "json"])
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.exit(run(["run", spec, "--export", target + "/t.svg", "--export", target + "/t.npz", "--format", "json"]))
"""


def test_a_read_only_folder_for_real(tmp_path):
    base = Path("/tmp") / f"attntrace-ro-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        spec = base / "spec.yaml"
        spec.write_text(ABC_TEXT)
        os.chmod(spec, 0o644)
        os.chmod(base, 0o555)
        result = subprocess.run([sys.executable, "-c", AS_NOBODY, str(spec), str(tmp_path), str(base)],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        documents = json_documents(result.stdout)
        assert result.returncode == 2 and len(documents) == 1, result.stdout + result.stderr
        assert documents[0]["diagnoses"][0]["code"] == "ATT-E064"
        assert sorted(p.name for p in base.iterdir()) == ["spec.yaml"]
    finally:
        os.chmod(base, 0o755)
        shutil.rmtree(base)


def test_a_failing_export_leaves_no_partial_set_and_one_json_document(invoke, spec_path, tmp_path, monkeypatch):
    """The third of three exports fails while writing: none is left, and stdout holds one document."""
    import tempfile
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, prefix="", **kwargs):
        if prefix.startswith(".c.json"):
            raise OSError(28, "No space left on device")
        return real_mkstemp(*args, prefix=prefix, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    targets = [tmp_path / name for name in ("a.svg", "b.npz", "c.json")]
    exit_code, output = invoke("run", spec_path, *[arg for t in targets for arg in ("--export", t)],
                               "--format", "json")
    documents = json_documents(output)
    assert exit_code == 2 and len(documents) == 1, output
    assert documents[0]["diagnoses"][0]["code"] == "ATT-E064" and "No space left" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]      # no target, no temporary file
    exit_code, output = invoke("run", spec_path, *[arg for t in targets for arg in ("--export", t)])
    assert exit_code == 2 and "Step 1/" not in output                        # rich: the error alone


def test_exports_that_succeed_are_all_written(invoke, spec_path, tmp_path):
    targets = [tmp_path / name for name in ("a.svg", "b.npz", "c.json", "d.txt", "e.html")]
    exit_code, output = invoke("run", spec_path, *[arg for t in targets for arg in ("--export", t)],
                               "--format", "json")
    assert exit_code == 0 and len(json_documents(output)) == 1
    assert all(t.stat().st_size > 0 for t in targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([t.name for t in targets] + ["spec.yaml"])


# --------------------------------------------------------------------------- diff

def test_diff_with_an_empty_npz(invoke, spec_path, tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    assert invoke("run", spec_path, "--export", tmp_path / "a.json")[0] == 0
    exit_code, output = invoke("diff", tmp_path / "a.json", tmp_path / "empty.npz")
    assert exit_code == 2 and codes(output) == ["ATT-E065"]


@pytest.mark.parametrize("flag, value", [("--rtol", "nan"), ("--atol", "nan"), ("--atol", "inf"),
                                         ("--rtol", "-1")])
def test_diff_tolerances_are_validated(invoke, spec_path, flag, value):
    exit_code, output = invoke("diff", spec_path, spec_path, flag, value, "--format", "json")
    documents = json_documents(output)
    assert exit_code == 2 and len(documents) == 1 and documents[0]["diagnoses"][0]["code"] == "ATT-E021"


def test_diff_with_nan_tolerance_from_the_api():
    from attntrace.analysis.diff import TraceData, diff_traces
    side = TraceData("a", "", ["h"], {"h": np.ones(2)})
    with pytest.raises(InputError) as error:
        diff_traces(side, side, rtol=float("nan"))
    assert error.value.diagnosis.code == "ATT-E021"


@pytest.mark.parametrize("value", [".nan", ".inf", "-1"])
def test_spec_tolerances_are_validated(invoke, write_spec, value):
    text = ABC_TEXT + f"expect:\n  atol: {value}\n  weights: {{cell: [0, 0], value: 0}}\n"
    refused(invoke, write_spec(text), "ATT-E021")


def test_grad_tolerance_nan(invoke, spec_path):
    exit_code, output = invoke("grad", spec_path, "--tolerance", "nan", "--format", "json")
    assert exit_code == 2 and json_documents(output)[0]["diagnoses"][0]["code"] == "ATT-E021"


@pytest.mark.parametrize("base", ["nan", "inf", "1"])
def test_positions_base_must_be_finite(invoke, base):
    exit_code, output = invoke("positions", "--kind", "rope", "--base", base, "--format", "json")
    assert exit_code == 2 and json_documents(output)[0]["diagnoses"][0]["code"] == "ATT-E042"
    exit_code, output = invoke("positions", "--kind", "rope", "--base", base)
    assert exit_code == 2 and "--base" in output and "Traceback" not in output


# --------------------------------------------------------------------------- numeric honesty

def test_b_o_without_w_o_is_an_input_error(invoke, write_spec):
    text = ABC_TEXT.replace("heads: 1", "heads: 1\n  b_o: [1, 2, 3, 4, 5]")
    assert refused(invoke, write_spec(text), "ATT-E002")["locations"][0]["path"] == "attention.b_o"


@pytest.mark.parametrize("base", [".inf", ".nan", "1", "-5"])
def test_positional_base_must_be_finite_and_above_one(invoke, write_spec, base):
    text = ABC_TEXT + f"positional: {{kind: sinusoidal, base: {base}}}\n"
    refused(invoke, write_spec(text), "ATT-E003")


def test_an_overflowing_scale_names_the_step_and_never_passes_a_check(invoke, write_spec):
    path = write_spec(yaml.safe_dump(scales_spec(1.0e308)))
    exit_code, output = invoke("run", path)
    assert exit_code == 0 and "ATT-E999" not in output                   # heatmaps of NaN draw
    assert "✓" not in output.replace("✓ every query may attend", "")     # no check passes on NaN
    exit_code, output = invoke("run", path, "--check", "all")             # nor the re-runs and recomputation
    assert "✓" not in output.replace("✓ every query may attend", "")
    exit_code, output = invoke("run", path, "--format", "json", "--strict")
    document = json.loads(output)
    assert exit_code == 1
    nonfinite = [d for d in document["diagnoses"] if d["code"] == "ATT-W204"]
    assert len(nonfinite) == 1                       # once, where it appears: the scaled scores
    assert nonfinite[0]["hook"] == "attn.hook_scaled" and "scale overflows" in nonfinite[0]["message"]
    assert any("attn.hook_pattern" in line for line in nonfinite[0]["details"])   # and where it spreads
    assert not [d for d in document["diagnoses"] if d["code"] == "ATT-W205"]     # the factor was right
    stats = {hook: entry["stats"] for hook, entry in document["hooks"].items()}
    assert stats["attn.hook_scaled"]["posinf"] + stats["attn.hook_scaled"]["neginf"] > 0   # honest counts


def test_a_hook_that_overflows_is_named_as_the_cause(invoke, spec_path):
    exit_code, output = invoke("run", spec_path, "--hook", "scores:scale=1e308", "--format", "json")
    document = json.loads(output)
    nonfinite = [d for d in document["diagnoses"] if d["code"] == "ATT-W204"]
    assert len(nonfinite) == 1 and "hook" in nonfinite[0]["message"]
    assert "✓ every row of weights sums to 1" not in document.get("checks_passed", [])
    assert not [d for d in document["diagnoses"] if d["code"] == "ATT-W205"
                and "√d_model" in (d["hint"] or "")]


def test_checks_decline_on_nan_rows():
    """The row-sum check, fed a NaN row, gives no verdict (None) instead of passing."""
    import attntrace
    from attntrace.analysis import checks

    def poison(array, *, hook):
        array = array.copy()
        array[..., 0, :] = np.nan
        return array
    trace = attntrace.run(json.loads(json.dumps(ABC)), hooks=[("attn.hook_pattern", poison)])
    assert "every row of weights sums to 1" not in trace.checks_passed
    assert [d.hook for d in trace.diagnoses if d.code == "ATT-W204"] == ["attn.hook_pattern"]
    assert checks.pattern_rows_sum_to_one.describes == "every row of weights sums to 1"


def test_w205_names_d_model_only_when_it_is_the_mistake():
    import attntrace
    from attntrace.analysis.bugs import inject
    spec = scales_spec("auto", heads=3)                   # d_model = 6, d_head = 2
    verdict = inject(attntrace.load_spec(spec), "scale-by-d-model")
    [warning] = [d for d in verdict.trace.diagnoses if d.code == "ATT-W205"]
    assert "not 1/√d_model" in warning.hint
    trace = attntrace.run(spec, hooks=[("attn.hook_scaled", lambda array, *, hook: array * 3)])
    [warning] = [d for d in trace.diagnoses if d.code == "ATT-W205"]
    assert "d_model" not in warning.hint and "scaled by 2.12" in warning.message


def test_no_runtime_warning_reaches_stderr(tmp_path):
    """Under -W error a numpy RuntimeWarning would be an exception: the overflow must be quiet."""
    path = tmp_path / "overflow.yaml"
    path.write_text(yaml.safe_dump(scales_spec(1.0e308)))
    for extra in ([], ["--format", "json"], ["--check", "all"]):
        result = subprocess.run([sys.executable, "-W", "error", "-m", "attntrace", "run", str(path), *extra],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr
        assert "Warning" not in result.stderr and "ATT-E999" not in result.stdout


# --------------------------------------------------------------------------- sizes before work

def test_impossible_token_counts_are_refused_before_loading(invoke, write_spec, monkeypatch):
    """200,000 tokens × 768: the scores alone need ≥ 160 GB; refused before 1.2 GB of embeddings are drawn."""
    from attntrace.inputs import sources
    drawn = []
    monkeypatch.setattr(sources, "_random", lambda *args: drawn.append(args) or np.zeros((1, 1)))
    monkeypatch.setattr(sources, "physical_memory", lambda: 16 * 10 ** 9)
    path = write_spec("version: 1\nembeddings: {random: {shape: [200000, 768]}}\n"
                      "attention: {heads: 12, W_q: {identity: 768}, W_k: {identity: 768}, W_v: {identity: 768}}\n")
    diagnosis = refused(invoke, path, "ATT-E010")
    assert "200,000" in diagnosis["message"] and "Q·Kᵀ" in diagnosis["message"] and "GB" in diagnosis["message"]
    assert diagnosis["locations"][0]["line"] == 2 and drawn == []


def test_an_array_bigger_than_the_machine_is_refused_before_reading(tmp_path, monkeypatch):
    from attntrace.inputs import sources
    monkeypatch.setattr(sources, "physical_memory", lambda: 1000)
    np.save(tmp_path / "w.npy", np.zeros((20, 20)))
    ctx = sources.SourceContext(tmp_path, lambda path: None)
    for source in ({"npy": "w.npy"}, {"random": {"shape": [20, 20]}}, {"identity": 20}):
        with pytest.raises(InputError) as error:
            sources.load_array(source, ctx, [])
        assert error.value.diagnosis.code == "ATT-E010" and "3.2 KB" in error.value.diagnosis.message


def test_explain_shapes_reads_headers_not_arrays(invoke, tmp_path, monkeypatch):
    """A 200,000 × 768 spec: explain-shapes takes sizes from headers and parameters, loads nothing."""
    from attntrace.inputs import sources
    header_only = tmp_path / "x.npy"
    with open(header_only, "wb") as handle:      # a valid header promising 1.2 GB the file does not hold
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False,
                                                     "shape": (200000, 768)})
    monkeypatch.setattr(sources, "read_npy", lambda *a, **k: pytest.fail("explain-shapes read array data"))
    monkeypatch.setattr(sources, "_random", lambda *a, **k: pytest.fail("explain-shapes drew random values"))
    spec = tmp_path / "big.yaml"
    spec.write_text("version: 1\nembeddings: {npy: x.npy}\nattention:\n  heads: 12\n  mask: causal\n"
                    "  W_q: {random: {shape: [768, 768]}}\n  W_k: {random: {shape: [768, 768]}}\n"
                    "  W_v: {identity: 768}\n  W_o: {random: {shape: [768, 768], std: 0.02}}\n")
    exit_code, output = invoke("explain-shapes", spec, "--format", "json")
    assert exit_code == 0, output
    flow = json.loads(output)["flow"]
    text = json.dumps(flow)
    assert "200000" in text and "768" in text


def test_array_info_matches_what_loading_gives(tmp_path):
    from attntrace.inputs.safetensors_io import safetensors_bytes
    from attntrace.inputs.sources import SourceContext, array_info, load_array
    np.save(tmp_path / "a.npy", np.ones((2, 3), dtype=np.float32))
    np.savez(tmp_path / "b.npz", w=np.ones((4, 5)))
    (tmp_path / "c.safetensors").write_bytes(b"".join(safetensors_bytes({"t": np.ones((6, 7), dtype=np.float32)})))
    ctx = SourceContext(tmp_path, lambda path: None)
    for source in ({"npy": "a.npy"}, {"npz": "b.npz", "key": "w"}, {"safetensors": "c.safetensors", "key": "t"},
                   {"random": {"shape": [2, 9]}}, {"identity": 3}):
        info, array = array_info(source, ctx, []), load_array(source, ctx, [])
        assert info.shape == array.shape and info.dtype == array.dtype, source


# --------------------------------------------------------------------------- interrupts

def _interrupted(process, ready: str, stream) -> str:
    """Wait until the process writes `ready` on `stream`, send SIGINT, wait; all of stdout and stderr."""
    seen = ""
    try:
        while ready not in seen:
            chunk = os.read(stream.fileno(), 4096).decode("utf-8", "replace")
            if not chunk:
                break
            seen += chunk
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return seen + out.decode("utf-8", "replace") + err.decode("utf-8", "replace")


def test_ctrl_c_during_a_run_exits_130_without_aborted(tmp_path):
    """SIGINT while a hook is busy: exit 130, 'interrupted' on stderr, no 'Aborted!', no traceback."""
    hooks = tmp_path / "slow.py"
    hooks.write_text("import sys, time\n"
                     "def slow(array, *, hook):\n"
                     "    sys.stderr.write('busy\\n'); sys.stderr.flush(); time.sleep(60)\n"
                     "HOOKS = [('attn.hook_pattern', slow)]\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(ABC_TEXT)
    process = subprocess.Popen([sys.executable, "-m", "attntrace", "run", str(spec), "--hook-file", str(hooks)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output = _interrupted(process, "busy", process.stderr)
    assert process.returncode == 130, output
    assert "interrupted" in output and "Aborted" not in output and "Traceback" not in output


def test_ctrl_c_at_the_stepper_prompt_exits_130(tmp_path):
    """A terminal on stdin: the stepper waits for a command; Ctrl-C there ends the run with 130."""
    import pty
    spec = tmp_path / "spec.yaml"
    spec.write_text(ABC_TEXT)
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "attntrace", "run", str(spec), "--step"], cwd=ROOT,
                               stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, NO_COLOR="1", TERM="dumb"))
    os.close(terminal)
    try:
        output = _interrupted(process, "(attntrace) step 1/", process.stdout)
    finally:
        os.close(controller)
    assert process.returncode == 130, output
    assert "interrupted" in output and "Aborted" not in output and "Traceback" not in output


# --------------------------------------------------------------------------- found by the fuzzer

def test_explain_shapes_of_transformer_blocks(invoke):
    from conftest import CONFIGS
    exit_code, output = invoke("explain-shapes", CONFIGS / "seed001_encoder_layer.yaml", "--format", "json")
    assert exit_code == 0, output
    names = [operand["name"] for step in json.loads(output)["flow"]["steps"] for operand in step["inputs"]]
    assert {"resid_pre", "W_in", "W_out"} <= set(names)


@pytest.mark.parametrize("tagged, code", [("!!int 1.5", "ATT-E005"), ("!!float abc", "ATT-E005"),
                                          ("!!timestamp 2001-99-99", "ATT-E001")])
def test_yaml_tags_that_cannot_be_built(invoke, write_spec, tagged, code):
    refused(invoke, write_spec(ABC_TEXT + f"description: {tagged}\n"), code)


@pytest.mark.parametrize("token_types, code", [
    ("{table: [[1, 1, 1, 1]], ids: [0, 5, 0]}", "ATT-E003"),          # an id past the table
    ("{table: [[1, 1, 1, 1]], ids: [0, 0.5, 0]}", "ATT-E003"),        # not a whole number
    ("{table: [[1, 1]], ids: [0, 0, 0]}", "ATT-E112"),                # table narrower than d_model
    ("{table: [[1, 1, 1, 1]], ids: [0, 0]}", "ATT-E112"),             # fewer ids than tokens
])
def test_token_types_that_do_not_fit(invoke, write_spec, token_types, code):
    table = "{random: {shape: [5, 4]}}"
    text = ABC_TEXT + f"positional: {{kind: learned, table: {table}, token_types: {token_types}}}\n"
    exit_code, output = invoke("run", write_spec(text), "--format", "json")
    assert exit_code == (3 if code == "ATT-E112" else 2) and json.loads(output)["diagnoses"][0]["code"] == code


def test_a_save_may_not_write_the_file_a_patch_reads(invoke, write_spec, tmp_path):
    np.save(tmp_path / "p.npy", np.ones((1, 3, 1, 2)))
    np.savez(tmp_path / "p.npz", **{"attn.hook_q": np.ones((1, 3, 1, 2))})
    before = (tmp_path / "p.npz").read_bytes()
    path = write_spec(ABC_TEXT + "hooks: ['weights:save=p.npz', 'Q:patch=p.npz']\n")
    refused(invoke, path, "ATT-E064")
    assert (tmp_path / "p.npz").read_bytes() == before
    exit_code, output = invoke("run", write_spec(ABC_TEXT + "hooks: ['Q:patch=p.npz']\n"),
                               "--hook", f"weights:save={tmp_path / 'p.npz'}")
    assert exit_code == 2 and "ATT-E064" in output and (tmp_path / "p.npz").read_bytes() == before


def test_mask_pictures_have_a_size_limit(invoke):
    exit_code, output = invoke("mask", "--seq", "100000", "--format", "json")
    assert exit_code == 2 and json_documents(output)[0]["diagnoses"][0]["code"] == "ATT-E022"


def test_re_running_checks_decline_when_the_trace_overflows():
    """--check all on a trace with NaN/inf: no causality or head verdicts, no RuntimeWarning."""
    import warnings

    import attntrace
    spec = scales_spec(1.0e308)
    spec["attention"]["mask"] = "causal"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace = attntrace.run(spec, check="all")
    assert not [d for d in trace.diagnoses if d.code in ("ATT-W224", "ATT-W225")]
    assert not [c for c in trace.checks_passed if "re-run" in c]


def test_grad_of_an_overflowing_spec_says_it_cannot_check(invoke, write_spec):
    """A forward pass that overflows gives NaN gradients: reported as such (W204), never a W230 'nan > tol'."""
    import warnings
    path = write_spec(yaml.safe_dump(scales_spec(1.0e308, heads=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exit_code, output = invoke("grad", path, "--cells", "2", "--format", "json")
    document = json.loads(output)
    assert exit_code == 1
    codes_seen = {d["code"] for d in document["diagnoses"]}
    assert "ATT-W204" in codes_seen and "ATT-W230" not in codes_seen


def test_a_check_passed_in_one_block_is_not_claimed_when_a_later_block_overflows():
    import attntrace
    spec = {"version": 1, "embeddings": [[0.5, -1.0], [1.0, 0.25]],
            "blocks": [{"attention": {"heads": 1, "W_q": [[1, 0], [0, 1]], "W_k": [[1, 0], [0, 1]],
                                      "W_v": [[1, 0], [0, 1]], "W_o": [[1e308, 0], [0, 1e308]]}},
                       {"attention": {"heads": 1, "W_q": [[1, 0], [0, 1]], "W_k": [[1, 0], [0, 1]],
                                      "W_v": [[1, 0], [0, 1]], "W_o": [[1, 0], [0, 1]]}}]}
    trace = attntrace.run(spec)
    assert any(d.code == "ATT-W204" for d in trace.diagnoses)
    assert "every row of weights sums to 1" not in trace.checks_passed
    assert "no NaN or inf in any step" not in trace.checks_passed


def test_batch_selection_of_a_broadcast_mask(invoke):
    from conftest import CONFIGS
    exit_code, output = invoke("run", CONFIGS / "mask_padding.yaml", "--batch", "1")
    assert exit_code == 0 and "ATT-E999" not in output


@pytest.mark.parametrize("hooks", ["5", "'weights:print'", "{hook: weights}"])
def test_hooks_must_be_a_list(invoke, write_spec, hooks):
    refused(invoke, write_spec(ABC_TEXT + f"hooks: {hooks}\n"), "ATT-E060")


@pytest.mark.parametrize("convention", ["[1, [2]]", "{a: 1}", "5"])
def test_a_mask_convention_of_another_type(invoke, write_spec, convention):
    text = ABC_TEXT.replace("heads: 1", f"heads: 1\n  mask: {{causal: true, convention: {convention}}}")
    refused(invoke, write_spec(text), "ATT-E003")
