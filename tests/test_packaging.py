"""Packaging facts that must stay true, and the CI rule that a missing reference fails.

- every non-Python file under attntrace/ is declared as package data (else a wheel leaves it out);
- the lower bounds in setup.cfg are exactly the versions .ci/lowest.txt pins (and CI tests);
- every command the README shows names files that exist in the repository;
- under CI=true, `require()` and a plain `pytest.importorskip` of a missing reference fail the run,
  checked by running pytest on generated test files with a stand-in module that cannot be imported.
"""
from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "attntrace"


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return parser


def requirement_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


# --------------------------------------------------------------------------- package data

def test_every_data_file_in_the_package_is_declared():
    patterns = requirement_lines(setup_cfg()["options.package_data"]["attntrace"])
    data_files = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*")
                  if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts]
    assert "examples/builtin.yaml" in data_files          # the file `attntrace run` needs
    undeclared = [name for name in data_files if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert undeclared == [], f"add these to [options.package_data] in setup.cfg: {undeclared}"


# --------------------------------------------------------------------------- version floors

def test_lower_bounds_are_the_pinned_lowest_versions():
    bounds = {}
    for line in requirement_lines(setup_cfg()["options"]["install_requires"]):
        name, _, version = line.partition(">=")
        assert version and "," not in version, f"{line!r}: give every runtime dependency one tested lower bound"
        bounds[name.strip().lower()] = version.strip()
    pins = {}
    for line in requirement_lines((ROOT / ".ci" / "lowest.txt").read_text(encoding="utf-8")):
        name, _, version = line.partition("==")
        pins[name.strip().lower()] = version.strip()
    assert bounds == pins


def test_python_requires_is_what_ci_runs():
    floor = setup_cfg()["options"]["python_requires"].removeprefix(">=")
    assert tuple(map(int, floor.split("."))) <= sys.version_info[:2]
    assert floor == "3.11"      # CI runs 3.11 only; lowering this needs a CI run on the lower version


# --------------------------------------------------------------------------- README commands

def load_readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                     # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_readme_commands_are_found_and_the_exit_table_is_current():
    module = load_readme_commands()
    commands = module.readme_commands(ROOT / "README.md")
    texts = [command.text for command in commands]
    assert "attntrace run configs/seed002_abc.yaml --steps scores,weights" in texts     # a ```text block's $ line
    assert any(text.startswith("python -m attntrace run") for text in texts)            # a ```bash block's line
    assert not any("ms" in text.split() for text in texts)                              # not the benchmark table
    assert module.stale_entries(commands) == []


def test_readme_commands_name_files_that_exist():
    """Every argument that looks like a file (configs/..., *.yaml) is in the repository or written by an
    earlier command (-o, --export, >); the commands .ci/readme_commands.py does not run are exempt."""
    module = load_readme_commands()
    written, missing = set(), []
    for command in module.readme_commands(ROOT / "README.md"):
        if command.key in module.NOT_RUN:
            continue
        words = shlex.split(command.key)
        outputs = {words[i + 1] for i, word in enumerate(words[:-1]) if word in module.OUTPUT_OPTIONS}
        for word in words:
            if word in outputs or word in written:
                continue
            if re.fullmatch(r"[\w./-]+\.(yaml|yml|npz|npy|json|safetensors)", word) and not (ROOT / word).is_file():
                missing.append(f"README.md:{command.line_number} {word}")
        written |= outputs
    assert missing == []


# --------------------------------------------------------------------------- a missing reference under CI

FAKE_TESTS = '''
import pytest
from conftest import require

def test_require():
    require("torch")

def test_plain_importorskip():
    pytest.importorskip("torch")

def test_skip_for_another_reason():
    pytest.skip("nothing to do with a reference library")

def test_passes():
    pass
'''
MODULE_LEVEL_SKIP = '''
import pytest
torch = pytest.importorskip("torch")

def test_never_collected():
    pass
'''


@pytest.fixture
def fake_suite(tmp_path):
    """A test folder with this conftest, and a `torch` that cannot be imported ahead of the real one."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "test_fake.py").write_text(FAKE_TESTS)
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL_SKIP)
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named torch (stand-in)", name="torch")\n')
    return tmp_path


def run_fake(folder: Path, **env_vars) -> tuple[int, dict[str, str]]:
    """Run pytest on the fake suite; return its exit code and each test's (or module's) outcome."""
    env = {key: value for key, value in os.environ.items() if key not in {"CI", "ATTNTRACE_FLOOR_RUN"}}
    env.update(env_vars, PYTHONPATH=str(folder / "shadow"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # a faster start
    junit = folder / f"{'-'.join(env_vars) or 'local'}.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "test_fake.py", "test_module_level.py",
                           "--continue-on-collection-errors", "-p", "no:cacheprovider", "-o", "addopts=",
                           "--rootdir", str(folder), f"--junitxml={junit}"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in {"failure", "error", "skipped"}]
        outcomes[case.get("name") or case.get("classname")] = kinds[0] if kinds else "passed"
    return done.returncode, outcomes


def test_locally_a_missing_reference_skips(fake_suite):
    code, outcomes = run_fake(fake_suite)
    assert code == 0
    assert outcomes == {"test_require": "skipped", "test_plain_importorskip": "skipped",
                        "test_skip_for_another_reason": "skipped", "test_passes": "passed",
                        "test_module_level": "skipped"}


def test_under_ci_a_missing_reference_fails(fake_suite):
    """require(), a plain importorskip in a test and one at module level (at collection) all fail."""
    code, outcomes = run_fake(fake_suite, CI="true")
    assert code == pytest.ExitCode.TESTS_FAILED
    assert outcomes == {"test_require": "failure", "test_plain_importorskip": "failure",
                        "test_skip_for_another_reason": "skipped", "test_passes": "passed",
                        "test_module_level": "error"}


def test_the_lowest_versions_run_may_skip_only_for_references(fake_suite):
    code, outcomes = run_fake(fake_suite, ATTNTRACE_FLOOR_RUN="1", CI="true")
    assert code == pytest.ExitCode.TESTS_FAILED
    assert outcomes == {"test_require": "skipped", "test_plain_importorskip": "skipped",
                        "test_skip_for_another_reason": "failure", "test_passes": "passed",
                        "test_module_level": "skipped"}
