"""The house rules, checked: one registry of codes, layers that only point down, no import cycles."""
import re
from pathlib import Path

import pytest
from conftest import ROOT

from attntrace.codes import CODES

PACKAGE = ROOT / "attntrace"
CODE = re.compile(r"ATT-[EWI]\d{3}")


def _raised_codes():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for match in CODE.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(match.group(0), path.relative_to(ROOT))
    return found


def test_every_code_in_the_sources_is_registered():
    missing = {code: str(path) for code, path in _raised_codes().items() if code not in CODES}
    assert not missing, f"codes used but not registered in attntrace/codes.py: {missing}"


def test_every_registered_code_is_used():
    unused = sorted(set(CODES) - set(_raised_codes()) - {"ATT-E999"})
    assert not unused, f"registered codes nothing raises: {unused}"


def test_every_registered_code_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Error codes"):]
    for code, entry in CODES.items():
        row = re.search(rf"^\| `{code}` \| (\d+) \| (.+) \|$", table, re.M)
        assert row, f"{code} has no row in the README's error-code table"
        assert int(row.group(1)) == entry.exit_code and row.group(2) == entry.meaning, code


def test_an_unregistered_code_is_a_bug_not_a_diagnosis():
    from attntrace.errors import Diagnosis
    with pytest.raises(ValueError, match="not registered"):
        Diagnosis("ATT-E998", "made up")


def _import_graph():
    grimp = pytest.importorskip("grimp")
    return grimp.build_graph("attntrace")


def test_no_import_cycles():
    graph = _import_graph()
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(imported=module, importer=imported):
                cycles.append(tuple(sorted((module, imported))))
    assert not sorted(set(cycles)), f"import cycles: {sorted(set(cycles))}"


def test_layers_point_down():
    """The same contract lint-imports checks in CI, run as a test so a local run sees it too."""
    import shutil
    import subprocess
    import sys
    pytest.importorskip("importlinter")
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    result = subprocess.run([command], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_numpy_rich_yaml_stay_out_of_cli_start_up():
    import subprocess
    import sys
    probe = ("import sys, attntrace.cli.main; "
             "print(sorted(m for m in ('numpy', 'rich', 'yaml', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip() == "['click']"


def test_the_built_in_run_loads_only_what_it_uses():
    """`attntrace run` on the built-in example (the start-up figure in benchmarks/) leaves out what
    only other runs need: each of these cost it 2-50 ms. What numpy, PyYAML, click and rich load
    by themselves does not count (numpy 1.24 imports json; rich 12 its tables and emoji codes)."""
    import subprocess
    import sys
    unused = ("attntrace.models", "attntrace.core.chunked", "attntrace.analysis.actions",
              "attntrace.analysis.dataflow", "threadpoolctl", "zipfile", "tempfile", "json", "difflib",
              "rich.table", "rich._emoji_codes", "concurrent.futures")
    probe = ("import io, sys\nimport click, numpy, numpy.random, yaml\n"
             "from rich.console import Console\nfrom rich.panel import Panel\nfrom rich.text import Text\n"
             "Console(file=io.StringIO(), emoji=False).print(Panel(Text('x'), title=Text('t')))\n"
             "by_floor = set(sys.modules)\n"
             "from attntrace.cli.main import main\nsys.argv = ['attntrace', 'run']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print('LOADED', sorted(m for m in {unused!r} if m in sys.modules and m not in by_floor))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.splitlines()[-1] == "LOADED []", out[-500:]


def test_drawing_only_in_render():
    """rich is imported by render/ alone (the CLI's error path reaches it through render.output)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "render":
            continue
        if re.search(r"^\s*(from rich|import rich)", path.read_text(encoding="utf-8"), re.M):
            offenders.append(str(rel))
    assert not offenders, f"rich used outside render/: {offenders}"
