"""Command-line values parsed in one place: click ParamTypes and the options every command shares.

A bad value becomes click's usage error (exit 2) naming the option, before a
command runs; commands receive plain Python values.  Only click is imported,
so ``attntrace --help`` stays instant.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import click


class OptionError(click.BadParameter):
    """A bad option value, with the diagnosis code it is reported under in JSON."""

    def __init__(self, message: str, param=None, ctx=None, code: str = "ATT-E022"):
        super().__init__(message, ctx=ctx, param=param)
        self.code = code


class _Type(click.ParamType):
    code = "ATT-E022"

    def fail(self, message, param=None, ctx=None):
        raise OptionError(message, param, ctx, self.code)


class IndexList(_Type):
    """"2", "0,2,5", "0-3", "1-3,7" or "all" -> a sorted tuple of indices (None for "all").

    Used for --head and --layers: whether an index exists is checked against the
    spec later, where the number of heads or layers is known."""

    name = "LIST"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx) -> Optional[Tuple[int, ...]]:
        if value is None or isinstance(value, tuple):
            return value
        text = str(value).strip()
        if text == "all":
            return None
        found = set()
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, dash, last = part.partition("-")
            try:
                start = int(first)
                stop = int(last) if dash else start
            except ValueError:
                self.fail(f"{text!r}: write {self.what} numbers from 0, ranges like 0-3, or 'all'", param, ctx)
            if start < 0 or stop < start:
                self.fail(f"{part!r}: a range goes from a smaller number to a larger one, from 0", param, ctx)
            found.update(range(start, stop + 1))
        if not found:
            self.fail(f"{text!r}: no {self.what} given", param, ctx)
        return tuple(sorted(found))


class PaddingRows(_Type):
    """"1,1,0" or "1,1,0;1,1,1" -> rows of 0/1, one per batch item (1 = a real token)."""

    name = "1,1,0"
    code = "ATT-E041"           # attntrace mask's option errors

    def convert(self, value, param, ctx) -> List[List[int]]:
        if isinstance(value, list):
            return value
        rows = []
        for text in filter(None, (part.strip() for part in str(value).split(";"))):
            items = [item.strip() for item in text.replace(" ", ",").split(",") if item.strip()]
            if any(item not in ("0", "1") for item in items):
                self.fail(f"{text!r}: write 1 for a real token and 0 for padding, comma-separated "
                          "(e.g. 1,1,1,0,0, or '1,1,0;1,1,1' for two batch items)", param, ctx)
            rows.append([int(item) for item in items])
        return rows


def all_rows(values) -> List[List[int]]:
    """The rows of a repeatable padding option; every batch item is padded to one length."""
    rows = [row for value in values for row in value]
    if len({len(row) for row in rows}) > 1:
        raise OptionError(f"--padding rows have different lengths ({', '.join(str(len(r)) for r in rows)}); "
                          "every batch item is padded to the same seq_k: pad the shorter rows with 0",
                          code=PaddingRows.code)
    return rows


SIZE = click.IntRange(min=1)
HEADS = IndexList("head")
LAYERS = IndexList("layer")
DTYPES = click.Choice(["float64", "float32"])


def width_option(f):
    return click.option("--width", type=click.IntRange(min=40),
                        help="Output width in columns (default: the terminal's, or COLUMNS).")(f)


def precision_option(default: int):
    return click.option("--precision", type=click.IntRange(0, 12), default=default, show_default=True,
                        help="Decimals shown.")


def dtype_option(f):
    return click.option("--dtype", type=DTYPES, default="float64", show_default=True,
                        help="float64 (exact, the default) or float32 (as models run).")(f)


def head_option(help_text: str = "Show only these heads: 2, 0,2 or 0-3 (repeatable).", name: str = "--head"):
    return click.option(name, "heads", type=HEADS, multiple=True, help=help_text, callback=_union)


def _union(ctx, param, values) -> Optional[Tuple[int, ...]]:
    """Repeated --head 0 --head 2 and lists --head 0,2 mean the same; none (or 'all') means every head."""
    if not values or any(v is None for v in values):
        return None
    return tuple(sorted({i for value in values for i in value}))


def check_selection(plan, *, heads: Optional[Tuple[int, ...]] = None, batch: Optional[int] = None,
                    layers: Optional[Tuple[int, ...]] = None) -> None:
    """--head, --batch and --layers against the sizes of a planned run, before anything runs (ATT-E017)."""
    from attntrace.errors import input_error  # lazily: errors are only needed when a selection is wrong
    for flag, chosen, size, what in (("--head", heads, plan.size("n_heads"), "head(s)"),
                                     ("--batch", (batch,) if batch is not None else None, plan.size("batch"),
                                      "batch item(s)"),
                                     ("--layers", layers, plan.n_blocks, "layer(s)")):
        if chosen and max(chosen) >= size:
            raise input_error("ATT-E017", f"{flag} {max(chosen)}: the spec has {size} {what}, numbered from 0",
                              hint=f"choose from 0 to {size - 1}")
