"""Run every attntrace command the README shows, from a fresh clone, and check its exit code.

A command is a line of a fenced block that is
  - in a ```bash / ```console / ```sh block: a line starting with `attntrace `, `python -m attntrace`
    or `$ ` followed by one of those;
  - in any other block except yaml/json/python (```text, plain ```): a line starting with `$ attntrace`
    or `$ python -m attntrace` (the other lines there are output, e.g. the benchmark table).
Each runs under bash in a fresh clone of the repository (so a file that is only on this machine does
not count), with no standard input and NO_COLOR set. The expected exit code is 0 unless EXPECTED_EXIT
below says otherwise, each with the README text that documents it; an entry that matches no command
fails the run, so the table cannot go stale.

    python .ci/readme_commands.py            # clone HEAD of this repository, run every command
    python .ci/readme_commands.py --list     # only print the commands and their expected codes
    python .ci/readme_commands.py --here     # run in this work tree instead of a clone
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELL_FENCES = {"bash", "console", "sh", "shell"}
SKIPPED_FENCES = {"yaml", "json", "python", "toml", "ini"}
COMMAND = re.compile(r"^(?:\$ )?(attntrace|python -m attntrace)(\s|$)")

# Commands the README documents as exiting non-zero:
#   command (without its # comment) -> (exit code, text the output must contain, where the README says so)
# The text tells the documented failure apart from another one with the same code (a missing file is exit 2 too).
EXPECTED_EXIT = {
    "attntrace run configs/bad_input/ragged_list.yaml": (2, "ATT-E004", "Exit codes: `2` bad input (ATT-E004 shown)"),
    "attntrace run configs/bug_qk_d_head.yaml": (3, "ATT-E101", "### Pre-flight shape diagnosis (exit 3)"),
    "attntrace run configs/bug_d_head_reshape.yaml": (3, "ATT-E103", "### Pre-flight shape diagnosis (exit 3)"),
    "attntrace run configs/seed000_cat_mouse.yaml --inject forgot-transpose-k":
        (3, "caught by ATT-E101", "run --inject: exit codes are the usual ones, 3 when the bug breaks shapes"),
    "attntrace bugs configs/gqa_8x2.yaml":
        (1, "not caught", "# every bug in turn; exit 1 if one went unnoticed (kv-heads-tiled is shown not caught)"),
    "attntrace diff configs/seed002_abc.yaml configs/seed002_abc.yaml --hook-b scores:scale=0.5 --top 3":
        (1, "first divergence", "### Diff: the exit code is 0 when the traces agree and 1 when they differ"),
}
# Commands not run here, with the reason (a file the README does not provide, a long run). Each is a
# gap in "every command runs as written from a fresh clone": fix the README, then drop the entry.
NOT_RUN: dict[str, str] = {
    "attntrace check run.safetensors":
        "run.safetensors is written by the Python capture example above it (needs torch), not by a command",
    "attntrace run spec.yaml":
        "the 16,384-token spec of .npy files is not in the repository (the memory-refusal example)",
    "attntrace run spec.yaml --dtype float32 --chunk 512 --steps block_max,out":
        "the 16,384-token spec of .npy files is not in the repository, and the run is long",
}
# Options after which a command names a file it writes (a later command may read it)
OUTPUT_OPTIONS = {">", "-o", "--output", "--export"}
TIMEOUT_S = 300


@dataclass(frozen=True)
class Command:
    line_number: int
    text: str                  # as written, without the leading "$ "

    @property
    def key(self) -> str:
        """The command without a trailing `# comment` (the key of EXPECTED_EXIT and NOT_RUN)."""
        return re.split(r"\s+#\s", self.text, maxsplit=1)[0].strip()


def readme_commands(readme: Path) -> list[Command]:
    """Every command the README shows, in order."""
    commands, fence = [], None
    for number, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip().lower() or "plain")
            continue
        if fence is None or fence in SKIPPED_FENCES or not COMMAND.match(line):
            continue
        if fence in SHELL_FENCES or line.startswith("$ "):
            commands.append(Command(number, line.removeprefix("$ ").strip()))
    return commands


def expected(command: Command) -> tuple[int, str]:
    """The exit code the README documents for the command, and a text its output must contain."""
    code, text, _where = EXPECTED_EXIT.get(command.key, (0, "", ""))
    return code, text


def stale_entries(commands: list[Command]) -> list[str]:
    """Entries of EXPECTED_EXIT / NOT_RUN that match no command of the README."""
    keys = {command.key for command in commands}
    return [key for key in [*EXPECTED_EXIT, *NOT_RUN] if key not in keys]


def fresh_clone(into: Path) -> Path:
    """A clone of this repository's HEAD: only committed files count."""
    target = into / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(target)], check=True)
    return target


def run(command: Command, cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    env.pop("ATTNTRACE_DEBUG", None)
    try:
        done = subprocess.run(["bash", "-c", command.text], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s"
    return done.returncode, done.stdout + done.stderr


def list_commands(commands: list[Command]) -> int:
    """Print the commands with their expected exit codes; 1 when there are none or the tables are stale."""
    for command in commands:
        print(f"README.md:{command.line_number}  exit {expected(command)[0]}  {command.text}")
    stale = stale_entries(commands)
    if stale:
        print("entries of .ci/readme_commands.py that match no README command:", *stale, sep="\n  ")
    if not commands:
        print("no commands found in README.md")
    return 1 if stale or not commands else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the commands and expected exit codes only")
    parser.add_argument("--here", action="store_true", help="run in this work tree, not a fresh clone")
    args = parser.parse_args(argv)

    if args.list:
        return list_commands(readme_commands(ROOT / "README.md"))
    with tempfile.TemporaryDirectory(prefix="readme-commands-") as temp:
        cwd = ROOT if args.here else fresh_clone(Path(temp))
        commands = readme_commands(cwd / "README.md")      # the README of the tree the commands run in
        if not commands or stale_entries(commands):
            return list_commands(commands) or 1
        failures = 0
        for command in commands:
            if command.key in NOT_RUN:
                print(f"not run  README.md:{command.line_number}  {command.text}  ({NOT_RUN[command.key]})")
                continue
            want, must_contain = expected(command)
            code, output = run(command, cwd)
            good = code == want and must_contain in output
            note = f" and {must_contain!r} in the output" if must_contain else ""
            print(f"{'ok' if good else 'FAILED':6}   README.md:{command.line_number}  exit {code} (want {want}{note})  "
                  f"{command.text}")
            if not good:
                failures += 1
                print("  " + "\n  ".join(output.splitlines()[-25:]))
    ran = len(commands) - sum(command.key in NOT_RUN for command in commands)
    print(f"README: {ran - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
