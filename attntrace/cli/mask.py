"""`attntrace mask`: build a mask from flags, show it in every convention, and apply it."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import PaddingRows, all_rows, head_option, precision_option, width_option

MASK_SIZE = click.IntRange(min=1, max=4096)      # a picture of a mask: 4096² cells is already a lot

CONVENTION_CHOICES = ("allow", "ignore", "additive", "additive-1e9", "keep")     # keep: allow's old name


def resolve_sizes(seq, seq_q, seq_k, tokens, padding_rows):
    """seq_q and seq_k from the flags, checking that they agree."""
    from attntrace.errors import input_error
    known = {}                                   # what bound seq_k, for messages
    if seq is not None:
        known["--seq"] = seq
    if seq_k is not None:
        known["--seq-k"] = seq_k
    if tokens:
        known["--tokens"] = len(tokens)
    if padding_rows:
        known["--padding"] = len(padding_rows[0])
    if len(set(known.values())) > 1:
        said = ", ".join(f"{flag} gives {size}" for flag, size in known.items())
        raise input_error("ATT-E041", f"the key length disagrees: {said}",
                          hint="--tokens and --padding name every key position; --seq-q sets fewer queries")
    if not known:
        raise input_error("ATT-E041", "how long is the sequence? give --seq N (or --tokens, --padding)",
                          hint="e.g. attntrace mask --causal --seq 6")
    keys = next(iter(known.values()))
    queries = seq_q if seq_q is not None else (seq if seq is not None else keys)
    return queries, keys


@click.command("mask")
@click.option("--causal", is_flag=True, help="Each query sees itself and earlier keys only.")
@click.option("--padding", "padding", type=PaddingRows(), multiple=True,
              help="Real tokens (1) and padding (0) of the keys; repeat, or separate rows with ';', "
                   "for one row per batch item.")
@click.option("--window", type=click.IntRange(min=1), help="Sliding window: keys less than N positions away "
              "(looking back only with --causal).")
@click.option("--prefix", type=click.IntRange(min=1), help="Prefix-LM: the first N keys are visible to every "
              "query; the rest is causal.")
@click.option("--seq", type=MASK_SIZE, help="Sequence length (queries and keys), up to 4096.")
@click.option("--seq-q", "seq_q", type=MASK_SIZE, help="Number of queries when it differs from "
              "the keys (KV-cache decoding: the queries are the last positions).")
@click.option("--seq-k", "seq_k", type=MASK_SIZE, help="Number of keys.")
@click.option("--tokens", help='Key tokens as labels, e.g. "the cat sat <pad>".')
@click.option("--convention", type=click.Choice(CONVENTION_CHOICES), help="Print the mask in this convention: "
              "allow (True = may attend; also written keep), ignore (True = blocked), additive (0 / -inf), "
              "additive-1e9 (0 / -1e9).")
@click.option("--apply", "apply_spec", type=click.Path(dir_okay=False, path_type=Path),
              help="Run this spec without and with the mask (the flags' mask, or the spec's own) "
                   "and show the weights before and after.")
@head_option("With --apply: show only these heads: 2, 0,2 or 0-3.")
@precision_option(3)
@width_option
@format_option
@handles_errors
def mask(causal, padding, window, prefix, seq, seq_q, seq_k, tokens, convention, apply_spec, heads,
         precision, width, fmt):
    """Show an attention mask: who may attend to whom, in every convention.

    \b
    attntrace mask --causal --seq 6
    attntrace mask --padding 1,1,1,0,0 --tokens "the cat sat <pad> <pad>"
    attntrace mask --padding 1,1,1,0,0 --padding 1,1,1,1,0        one row per batch item
    attntrace mask --causal --window 3 --seq 8                      sliding window
    attntrace mask --prefix 3 --seq 6                               prefix-LM
    attntrace mask --causal --seq-q 3 --seq-k 8                     KV-cache decoding
    attntrace mask --causal --seq 4 --convention ignore             as nn.MultiheadAttention wants it
    attntrace mask --causal --apply configs/seed002_abc.yaml        weights before and after

    Kinds combine with logical AND (a prefix-LM already is causal).  The grid
    uses attntrace's convention, True = may attend (PyTorch scaled_dot_product_attention);
    nn.MultiheadAttention's boolean masks mean the opposite.
    """
    import numpy as np

    from attntrace.analysis import maskinfo
    from attntrace.core import masks
    from attntrace.errors import EXIT_OK, input_error
    from attntrace.render.mask_view import mask_to_json, render_mask
    from attntrace.render.output import make_console, print_json

    padding_rows = all_rows(padding)
    token_list = tokens.split() if tokens else None
    has_flags = bool(causal or padding_rows or window or prefix)
    traces = None
    if apply_spec is not None:
        from attntrace.analysis.run import load as load_spec
        from attntrace.core.plan import plan_from_spec
        spec = load_spec(apply_spec)
        plan = plan_from_spec(spec)
        queries, keys, batch = plan.size("seq_q"), plan.size("seq_k"), plan.size("batch")
        for flag, given, size in (("--seq", seq, keys), ("--seq-q", seq_q, queries), ("--seq-k", seq_k, keys),
                                  ("--padding", len(padding_rows[0]) if padding_rows else None, keys)):
            if given is not None and given != size:
                raise input_error("ATT-E041", f"{flag} gives {given} but the spec {apply_spec} has "
                                              f"{'seq_q' if flag == '--seq-q' else 'seq_k'}={size}",
                                  hint="with --apply the sizes come from the spec; drop the flag")
        if token_list:
            raise input_error("ATT-E041", "with --apply the token labels come from the spec; drop --tokens")
        if len(padding_rows) not in (0, 1, batch):
            raise input_error("ATT-E041", f"--padding gives {len(padding_rows)} rows but the spec has batch "
                                          f"size {batch}", hint="give one row, or one per batch item")
        if not has_flags and spec.attention_of(0).mask.is_empty:
            raise input_error("ATT-E041", f"nothing to apply: {apply_spec} has no mask and no mask flag was given",
                              hint="add --causal, --padding, --window or --prefix")
        if has_flags:
            keep = masks.combine(queries, keys, causal_=causal, window_size=window, prefix=prefix,
                                 padding_keep=np.array(padding_rows, dtype=bool) if padding_rows else None)
            description = maskinfo.describe_kinds(causal, len(padding_rows), window, prefix)
        else:
            keep = masks.build(spec.attention_of(0).mask, batch, queries, keys)
            description = spec.attention_of(0).mask.describe() + " (from the spec)"
        traces = maskinfo.before_after(spec, keep if has_flags else None)
        query_tokens, key_tokens = list(spec.tokens), list(spec.key_tokens)
    else:
        queries, keys = resolve_sizes(seq, seq_q, seq_k, token_list, padding_rows)
        keep = masks.combine(queries, keys, causal_=causal, window_size=window, prefix=prefix,
                             padding_keep=np.array(padding_rows, dtype=bool) if padding_rows else None)
        description = maskinfo.describe_kinds(causal, len(padding_rows), window, prefix)
        key_tokens = token_list or [str(i) for i in range(keys)]
        query_tokens = masks.query_labels(key_tokens, queries)
    convention = masks.OLD_CONVENTION_NAMES.get(convention, convention)
    picture = maskinfo.MaskPicture(keep, description, query_tokens, key_tokens, convention or "additive")
    warning = maskinfo.empty_row_warning(picture)
    diagnoses = [warning] if warning else []
    if fmt == "json":
        print_json(mask_to_json(picture, diagnoses, traces))
    else:
        render_mask(make_console(width), picture, diagnoses, traces, precision=precision,
                    heads=list(heads) if heads else None, explicit_convention=convention is not None)
    raise SystemExit(EXIT_OK)
