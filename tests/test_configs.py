"""The seed example configs, every hook against the plain-loop reference, and clean.

The spec loader resolves the array sources (inline, random, identity, tables);
the numbers after that come from tests/reference.py, never from the engine.
"""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402
from conftest import CONFIGS  # noqa: E402

import attntrace  # noqa: E402

SEED_CONFIGS = ["seed000_cat_mouse.yaml", "seed000_king_queen.yaml", "seed002_abc.yaml",
                "seed003_ticket_heads.yaml", "seed004_batch_multihead.yaml", "causal_gpt.yaml"]


def reference_for(spec):
    att = spec.attention
    scale = {"auto": None, "none": 1.0}.get(att.scale, att.scale)
    keep = None
    if att.mask.causal:
        keep = np.array(ref.causal_keep(len(spec.tokens), len(spec.key_tokens)))
    data = lambda a: None if a is None else a.data  # noqa: E731
    return ref.attention(
        spec.source.embeddings.data, att.W_q.data, att.W_k.data, att.W_v.data, data(att.W_o),
        X_enc=data(spec.encoder.embeddings) if spec.encoder else None,
        b_q=data(att.b_q), b_k=data(att.b_k), b_v=data(att.b_v), b_o=data(att.b_o),
        heads=att.heads, kv_heads=att.kv_heads, layout=att.layout, scale=scale, keep=keep)


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_config_matches_reference_and_is_clean(name):
    spec = attntrace.load_spec(CONFIGS / name)
    trace = attntrace.run(spec, keep="all")
    expected = reference_for(spec)
    for hook, array in trace.arrays.items():
        want = expected[ref.HOOK_TO_KEY[hook]]
        if array.dtype == bool:
            np.testing.assert_array_equal(np.broadcast_to(array, want.shape), want, err_msg=hook)
        else:
            np.testing.assert_allclose(array, want, rtol=1e-12, atol=1e-12, err_msg=hook)
    assert trace.diagnoses == [], [d.message for d in trace.diagnoses]


def test_seed003_shapes_and_two_heads():
    trace = attntrace.run(CONFIGS / "seed003_ticket_heads.yaml")
    assert trace["weights"].shape == (1, 2, 10, 10)
    assert trace["output"].shape == (1, 10, 4)
    assert trace.spec.tokens[9] == "机票"


def test_seed004_batch_two_eight_heads():
    trace = attntrace.run(CONFIGS / "seed004_batch_multihead.yaml")
    assert trace.plan.size("batch") == 2 and trace.plan.size("d_head") == 8
    # scale 1/sqrt(d_k) with d_k = 64 / 8
    assert trace.plan.scale == pytest.approx(1 / math.sqrt(8))


def test_causal_config_blocks_the_future():
    trace = attntrace.run(CONFIGS / "causal_gpt.yaml")
    pattern = trace["weights"]
    upper = np.triu(np.ones((6, 6), dtype=bool), k=1)
    assert (pattern[..., upper] == 0).all()
    assert pattern[0, :, 0, 0].tolist() == [1.0, 1.0]       # the first token sees only itself
