"""`run --step` on a terminal: readline's line editing and history (the Up arrow recalls a
command instead of typing ^[[A), driven through a pseudo-terminal."""
from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ABC, ROOT

from attntrace.render.stepper import LineReader

pytest.importorskip("readline")
pty = pytest.importorskip("pty")

PROMPT = b"(attntrace) step 1/"
UP = b"\x1b[A"


class Terminal:
    """A child process whose stdin, stdout and stderr are one pseudo-terminal."""

    def __init__(self, args, cwd):
        self.controller, terminal = pty.openpty()
        self.process = subprocess.Popen(args, cwd=cwd, stdin=terminal, stdout=terminal, stderr=terminal,
                                        env=dict(os.environ, TERM="xterm", NO_COLOR="1", COLUMNS="120"))
        os.close(terminal)
        self.output = b""

    def wait_for(self, token: bytes, count: int = 1, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.output.count(token) < count and time.time() < deadline:
            ready, _, _ = select.select([self.controller], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.controller, 65536)
                except OSError:
                    return
        assert self.output.count(token) >= count, self.output.decode("utf-8", "replace")[-2000:]

    def type(self, keys: bytes) -> None:
        os.write(self.controller, keys)

    def close(self) -> int:
        try:
            self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self.controller)
        return self.process.returncode


def stepper(tmp_path) -> Terminal:
    """`attntrace run spec.yaml --step` on a pseudo-terminal, as a person at a keyboard runs it."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(ABC))
    return Terminal([sys.executable, "-m", "attntrace", "run", str(spec), "--step"], ROOT)


def test_the_up_arrow_recalls_the_last_command(tmp_path):
    terminal = stepper(tmp_path)
    try:
        terminal.wait_for(PROMPT)
        terminal.type(b"stats\r")
        terminal.wait_for(PROMPT, 2)
        terminal.type(UP + b"\r")                       # readline recalls `stats` and runs it again
        terminal.wait_for(PROMPT, 3)
        terminal.type(b"c\r")
        terminal.wait_for(b"no warnings")
    finally:
        code = terminal.close()
    text = terminal.output.decode("utf-8", "replace")
    assert code == 0
    assert "unknown command" not in text and "^[[A" not in text
    assert text.count("step   hook") == 2            # two stats tables: typed, then recalled


def test_line_editing_moves_in_the_line(tmp_path):
    """Left arrow then a typed letter edits the middle of the line: `sats` becomes `stats`."""
    terminal = stepper(tmp_path)
    try:
        terminal.wait_for(PROMPT)
        terminal.type(b"sats" + b"\x1b[D" * 3 + b"t\r")
        terminal.wait_for(PROMPT, 2)
        terminal.type(b"q\r")
        terminal.wait_for(b"stopped after")
    finally:
        code = terminal.close()
    text = terminal.output.decode("utf-8", "replace")
    assert code == 0 and "unknown command" not in text and "stopped after step 1/" in text


def test_readline_is_used_only_for_a_terminal_stdin():
    assert LineReader(io.StringIO("n\n")).editing is False           # scripted input: plain reads
    with open(os.devnull) as devnull:
        assert LineReader(devnull).editing is False


def test_ctrl_c_while_readline_waits_exits_130(tmp_path):
    import signal
    terminal = stepper(tmp_path)
    try:
        terminal.wait_for(PROMPT)
        terminal.type(b"sta")                           # half a command in the line editor
        time.sleep(0.3)
        terminal.process.send_signal(signal.SIGINT)
        terminal.wait_for(b"interrupted")
    finally:
        code = terminal.close()
    text = terminal.output.decode("utf-8", "replace")
    assert code == 130 and "Aborted" not in text and "Traceback" not in text
