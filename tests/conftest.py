import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Seed 002's A/B/C example as a spec dict (the numbers of configs/seed002_abc.yaml)
ABC_X = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
ABC = {"version": 1, "name": "abc", "tokens": ["A", "B", "C"], "embeddings": ABC_X,
       "attention": {"heads": 1, "W_q": [[1, 0], [1, 0], [0, 1], [0, 1]],
                     "W_k": [[0, 1], [0, 1], [1, 0], [1, 0]], "W_v": [[1, 0], [0, 1], [1, 0], [0, 1]]}}


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch):
    # the CLI renders plain text under NO_COLOR; tests read that text
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("ATTNTRACE_DEBUG", raising=False)


@pytest.fixture
def write_spec(tmp_path):
    """Write YAML text to a spec file in a temp folder and return its path."""
    def write(text, name="spec.yaml"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path
    return write


@pytest.fixture
def spec_path(tmp_path):
    """Seed 002's A/B/C spec written to a temp folder."""
    import yaml
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(ABC), encoding="utf-8")
    return path


@pytest.fixture
def invoke():
    """Run the CLI in-process; return (exit_code, output text)."""
    from click.testing import CliRunner

    from attntrace.cli.main import cli

    def run(*args, input=None):
        runner = CliRunner()
        result = runner.invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)
        return result.exit_code, result.output
    return run


# --------------------------------------------------------------------------- references under CI
# The cross-checks compare attntrace with independent references (torch, transformers, the
# MiniLM checkpoint, a real Chromium).  On a developer's machine a missing reference skips
# those tests; under CI=true it fails them, so a run cannot go green with them skipped.

UNDER_CI = os.environ.get("CI") == "true"
# .ci/run's lowest-versions run installs only the four runtime packages and the test tools:
# there the references may be missing, and every OTHER skip fails (see _judge_skip).
FLOOR_RUN = os.environ.get("ATTNTRACE_FLOOR_RUN") == "1"
REFERENCE_WORDS = ("torch", "transformers", "tokenizers", "safetensors", "chromium", "playwright", "minilm",
                   "importlinter", "grimp")


def require(module_name: str, why: str = "a reference for these tests"):
    """The module, or a skip when it is not installed here; under CI=true a missing reference fails.

    Works inside a test and at module level (the whole module is skipped, or fails to collect under CI).
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        reason = f"{module_name} is not installed ({why}): {exc}"
        if UNDER_CI and not FLOOR_RUN:
            pytest.fail(f"{reason}; under CI=true a missing reference is a failure, not a skip", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def _skip_reason(report) -> str | None:
    """The reason of a skipped (not xfailed) test or collector report, else None."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)


def _judge_skip(report) -> None:
    """Under CI=true, a skip for a missing reference becomes a failure; in the floor run, any other skip does."""
    reason = _skip_reason(report)
    if reason is None:
        return
    about_a_reference = any(word in reason.lower() for word in REFERENCE_WORDS)
    if UNDER_CI and not FLOOR_RUN and about_a_reference:
        verdict = "under CI=true a skipped cross-check is a failure"
    elif FLOOR_RUN and not about_a_reference:
        verdict = "the lowest-versions run may skip only tests that need a reference library"
    else:
        return
    report.outcome = "failed"
    report.longrepr = f"{verdict}: {reason}"


def pytest_collection_modifyitems(config, items):
    """The long fuzz run (`@pytest.mark.fuzz`) is deselected unless `-m fuzz` asks for it: not a skip,
    so the lowest-versions run (where any skip fails) does not count it."""
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    long_runs = [item for item in items if item.get_closest_marker("fuzz")]
    if long_runs:
        config.hook.pytest_deselected(items=long_runs)
        items[:] = [item for item in items if not item.get_closest_marker("fuzz")]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _judge_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # a module-level pytest.importorskip skips the whole module at collection
    report = yield
    _judge_skip(report)
    return report
