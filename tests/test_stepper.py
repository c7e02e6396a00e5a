"""`run --step`: a debugger-like pause after each step, driven here by scripted input."""
from __future__ import annotations

import io
import os

import yaml
from conftest import ABC  # noqa: E402

from attntrace.render.stepper import LineReader

STEPS = 11     # embed, q, k, v, qk, scaled, attn_scores, pattern, z, z_concat, out


def prompts(out):
    return [line for line in out.splitlines() if line.startswith("(attntrace) step")]


def test_next_pauses_after_every_step(invoke, spec_path):
    code, out = invoke("run", spec_path, "--step", input="n\n" * (STEPS - 1))
    assert code == 0
    # a prompt after each step but the last, numbered in order
    assert [p.split()[2] for p in prompts(out)] == [f"{i}/{STEPS}" for i in range(1, STEPS)]
    assert "Step 11/11" in out and "no warnings" in out


def test_show_stats_help_and_continue(invoke, spec_path):
    script = "n\nn\nshow Q\nshow 1\nshow weights\nshow nonsense\nstats\nhelp\nbogus\nc\n"
    code, out = invoke("run", spec_path, "--step", input=script)
    assert code == 0
    assert len(prompts(out)) == 10              # nine commands at step 3, the first two at steps 1 and 2
    assert out.count("Step 2/11  Q = X·W_q") == 2          # once as it runs, once for `show Q`
    assert "attn.hook_pattern is step 8; it has not run yet (now at step 3)" in out
    assert "unknown hook 'nonsense'" in out
    assert "unknown command 'bogus'; type help" in out
    assert "continue, c" in out                               # the help text
    stats_rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert [row[1] for row in stats_rows[:3]] == ["hook_embed", "attn.hook_q", "attn.hook_k"]
    # after `continue` the rest runs without pausing
    assert "Step 11/11" in out and "(attntrace) step 4/" not in out


def test_quit_stops_the_run(invoke, spec_path):
    code, out = invoke("run", spec_path, "--step", input="n\nq\n")
    assert code == 0
    assert "stopped after step 2/11 'Q = X·W_q, split heads'" in out
    assert "Step 3/11" not in out


def test_no_input_runs_to_the_end(invoke, spec_path):
    code, out = invoke("run", spec_path, "--step", input="")
    assert code == 0
    assert "end of input: running to the end" in out and "Step 11/11" in out


def test_expectations_are_checked_after_stepping(invoke, tmp_path):
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump(dict(ABC, expect={"scores": {"cell": ["B", "C"], "value": 400}})),
                    encoding="utf-8")
    code, out = invoke("run", path, "--step", input="c\n")
    assert code == 1                             # 9·21 + 13·17 = 410, not 400
    assert "400 ≠ 410" in out


def test_step_refuses_json(invoke, spec_path):
    code, out = invoke("run", spec_path, "--step", "--format", "json")
    assert code == 2 and "ATT-E068" in out


def test_line_reader_gives_up_on_a_silent_pipe():
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"next\nshow Q\n")
        with os.fdopen(read_end, "rb", buffering=0) as stream:
            reader = LineReader(stream, timeout=0.2)
            assert not reader.interactive
            assert reader.readline() == "next\n"
            assert reader.readline() == "show Q\n"
            assert reader.readline() is None            # the writer is open but silent: gives up
    finally:
        os.close(write_end)


def test_line_reader_on_a_text_stream():
    reader = LineReader(io.StringIO("n\n"))
    assert reader.readline() == "n\n" and reader.readline() is None
