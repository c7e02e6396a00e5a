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


def require(module_name: str):
    """The module, or a skip when it is not installed here; under CI=true a missing reference fails."""
    import importlib
    import os
    try:
        return importlib.import_module(module_name)
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{module_name} is not installed (a reference for these tests)", allow_module_level=True)
