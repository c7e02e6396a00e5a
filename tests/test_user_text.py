"""What the user wrote (a spec's name, tokens, progress labels) is printed as written:
never read as rich markup ("[/b]" once crashed the run with ATT-E999) or as emoji codes (":cat:")."""
from __future__ import annotations

import io

from test_expect import SEED002

from attntrace.render.progress import progress_bar

ODD_NAME = "[/b] [red]not red :cat:"
ODD_TOKENS = ["[b]", "[/i]", ":cat:"]


def _odd_tokens(spec_text: str) -> str:
    return spec_text.replace("tokens: [A, B, C]", "tokens: [" + ", ".join(f'"{t}"' for t in ODD_TOKENS) + "]")


def test_a_spec_name_with_markup_and_emoji_codes_is_the_title(write_spec, invoke):
    path = write_spec(f'version: 1\nname: "{ODD_NAME}"\n' + SEED002.replace("version: 1\n", ""))
    code, output = invoke("run", path)
    assert code == 0, output
    assert f"attntrace · {ODD_NAME}" in output
    assert "🐱" not in output


def test_tokens_with_markup_label_rows_columns_and_expect_tables(write_spec, invoke):
    # row [/i] (was B) of Q·Kᵀ is [58, 234, 410]; 400 is seed 002's mistake
    path = write_spec(_odd_tokens(SEED002) + 'expect:\n  scores: {row: "[/i]", values: [58, 234, 400]}\n')
    code, output = invoke("check", path)
    assert code == 1, output
    assert "[/i]" in output and ":cat:" in output and "🐱" not in output
    code, output = invoke("run", path)
    assert code == 1, output
    for token in ODD_TOKENS:
        assert token in output


def test_a_progress_label_with_markup_is_drawn(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    with progress_bar("[/b] grad", enabled=True) as update:
        update(1, 2, "[/i] :cat:")
        update(2, 2, "[/i] :cat:")
    # transient: the bar is erased at the end; what counts is that drawing it raised nothing
    assert "MarkupError" not in stderr.getvalue()


def test_a_long_token_is_cut_in_labels_and_every_column_still_fits(write_spec):
    """An 80-character token is drawn as its first 15 characters and "…" (as a row, a column and a
    row's "max →"); the weights are paged by columns so that every row stays on one line that fits
    the width, and every key is shown on some page."""
    import re

    from click.testing import CliRunner

    from attntrace.cli.main import cli
    long = "averyvery" * 9
    path = write_spec(f"""version: 1
tokens: [{long}, b, c, d]
embeddings: {{random: {{shape: [4, 8], seed: 0}}}}
attention:
  heads: 1
  W_q: {{random: {{shape: [8, 8], seed: 1}}}}
  W_k: {{random: {{shape: [8, 8], seed: 2}}}}
  W_v: {{random: {{shape: [8, 8], seed: 3}}}}
""")
    result = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"}).invoke(cli, ["run", str(path), "--steps", "weights"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert long not in result.output.replace("\n", "") and long[:15] + "…" in result.output
    pages = re.findall(r"keys (\d+)–(\d+) of 4", result.output)
    assert {k for first, last in pages for k in range(int(first), int(last) + 1)} == {0, 1, 2, 3}
    rows = [line for line in lines if line.startswith(("b ", "c ", "d ", long[:15] + "…"))]
    assert len(rows) == 4 * len(pages) and all("→" in row for row in rows)      # no row wrapped or cut
    assert any(row.endswith("→ " + long[:15] + "…") for row in rows)           # the long token as a row's max
