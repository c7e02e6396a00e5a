"""Bugs from the field on real checkpoints, against transformers and torch.

* positions of a left-padded batch: attntrace's clean run equals transformers' GPT-2 given
  position_ids = cumsum(attention_mask) − 1 (what generate() passes); with
  `left-padding-positions` it equals transformers without them (transformers#22161);
* RoPE bugs on a tiny Llama (GQA): `rope-pairing-mismatch` equals transformers' rotate_half
  applied in the interleaved basis (nanotron#427's permutation), caught in every layer;
  `rope-low-precision` is caught; `fused-qkv-split-under-gqa` is a shape error;
* padding bugs on a batch of texts: `nan-leak-through-mask` on the real MiniLM;
* no detector says anything on the clean models (MiniLM, GPT-2, Llama, Mistral with a window),
  and the cross-check's second backend is torch's scaled_dot_product_attention;
* a capture of a module with a float16 softmax written out by hand is named
  `softmax-in-half-precision`.

Under CI=true a missing torch / transformers / MiniLM fails instead of skipping.
"""
from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import MINILM, minilm_folder, torch, transformers  # noqa: F401 (torch, transformers required)

from attntrace.analysis.bugs import CATALOGUE, inject
from attntrace.analysis.crosscheck import torch_sdpa_crosscheck
from attntrace.analysis.run import run
from attntrace.models.build import model_spec
from attntrace.models.families import load_model
from attntrace.models.tokenize import from_ids

TEXTS = ["The cat sat on the mat.", "Attention is all you need", "Colorless green ideas sleep furiously"]
LEFT_IDS = [[0, 0, 5, 9, 12, 3], [7, 1, 25, 4, 39, 6]]          # item 0: two pads, then four real tokens
LEFT_MASK = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
SMALL = dict(vocab_size=40, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _saved(tmp, name, model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():                      # every parameter drawn, so a wrong one changes the numbers
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 and pname.endswith("weight") else
                    (0.2 if p.ndim == 1 else 0.5) * noise)
    model.eval().save_pretrained(tmp / name)
    return tmp / name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("field")
    t = transformers
    return {
        "gpt2": _saved(tmp, "gpt2", t.GPT2LMHeadModel(t.GPT2Config(
            n_embd=16, n_layer=2, n_head=4, n_positions=16, **SMALL)), 11),
        "llama": _saved(tmp, "llama", t.LlamaForCausalLM(t.LlamaConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, **SMALL)), 12),
        "mistral": _saved(tmp, "mistral", t.MistralModel(t.MistralConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            sliding_window=3, max_position_embeddings=64, **SMALL)), 13),
    }


def left_padded(folder, dtype):
    loaded = load_model(str(folder), dtype=dtype)
    return model_spec(loaded, from_ids(LEFT_IDS, loaded.config, attention_mask=LEFT_MASK))


def hf_last_hidden(folder, dtype, position_ids=None):
    model = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="eager")
    model = (model.double() if dtype == "float64" else model.float()).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(LEFT_IDS), attention_mask=torch.tensor(LEFT_MASK),
                    position_ids=position_ids)
    return out.last_hidden_state.numpy()


REAL = np.array(LEFT_MASK, dtype=bool)


# =========================================================================== positions of a left-padded batch

def test_left_padded_gpt2_counts_positions_from_the_first_real_token(tiny):
    spec = left_padded(tiny["gpt2"], "float64")
    final = run(spec, keep="all").plan.steps[-1].hook
    clean = run(spec, keep="all", dtype="float64")[final]
    buggy = run(spec, keep="all", dtype="float64", overrides=CATALOGUE["left-padding-positions"].overrides())[final]
    mask = torch.tensor(LEFT_MASK)
    generate_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)           # transformers' generate()
    with_ids = hf_last_hidden(tiny["gpt2"], "float64", generate_positions)
    without_ids = hf_last_hidden(tiny["gpt2"], "float64")                            # arange: counted from pads
    assert np.abs(clean[REAL] - with_ids[REAL]).max() < 1e-10
    assert np.abs(buggy[REAL] - without_ids[REAL]).max() < 1e-10
    assert np.abs(clean[0, 2:] - buggy[0, 2:]).max() > 0.1                           # the pads moved every row
    verdict = inject(spec, "left-padding-positions")
    assert verdict.status == "caught" and verdict.codes == ["ATT-W241"] and verdict.fix_check["verified"]


def test_left_padded_llama_matches_transformers_with_position_ids(tiny):
    spec = left_padded(tiny["llama"], "float32")
    trace = run(spec, keep="all", dtype="float32")
    mask = torch.tensor(LEFT_MASK)
    theirs = hf_last_hidden(tiny["llama"], "float32", (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))
    assert np.abs(trace[trace.plan.steps[-1].hook][REAL] - theirs[REAL]).max() < 1e-4
    assert trace.warnings == [] and [d.code for d in trace.diagnoses] == ["ATT-I240"]      # said once, 2 layers
    verdict = inject(spec, "left-padding-positions", dtype="float32")
    # RoPE scores depend on m − n only: the output survives, the rotations do not, and W241 says so
    assert verdict.status == "caught" and verdict.codes == ["ATT-W241"]
    assert {d.hook for d in verdict.caught} == {f"blocks.{i}.attn.hook_rot_{w}" for i in (0, 1) for w in "qk"}


# =========================================================================== RoPE and GQA bugs on a Llama

def test_rope_pairing_mismatch_on_a_llama_is_rotate_half_in_the_interleaved_basis(tiny):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    loaded = load_model(str(tiny["llama"]), dtype="float64")
    spec = model_spec(loaded, from_ids([[3, 17, 5, 9, 31, 2, 11]], loaded.config))
    bug = run(spec, keep="all", overrides=CATALOGUE["rope-pairing-mismatch"].overrides())
    q = bug["blocks.0.attn.hook_q"]                                   # (1, seq, heads, d_head)
    d = q.shape[-1]
    basis = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # interleaved pairs → halves (nanotron#427)
    rope = LlamaRotaryEmbedding(config=transformers.AutoConfig.from_pretrained(str(tiny["llama"])))
    positions = torch.arange(q.shape[1])[None]
    cos, sin = rope(torch.zeros(1, dtype=torch.float64), positions)
    permuted = torch.from_numpy(np.ascontiguousarray(q[..., basis].transpose(0, 2, 1, 3)))
    rotated, _ = apply_rotary_pos_emb(permuted, permuted, cos.double(), sin.double())
    expected = np.empty_like(q)
    expected[..., basis] = rotated.numpy().transpose(0, 2, 1, 3)
    assert np.abs(bug["blocks.0.attn.hook_rot_q"] - expected).max() < 1e-6         # transformers' angles are float32
    verdict = inject(spec, "rope-pairing-mismatch")
    assert verdict.status == "caught" and verdict.codes == ["ATT-W240"]
    assert {d.hook for d in verdict.caught} == {f"blocks.{i}.attn.hook_rot_{w}" for i in (0, 1) for w in "qk"}
    assert "rotates the pairs 2i with 2i+1" in verdict.caught[0].message


def test_rope_low_precision_and_fused_qkv_on_a_llama(tiny):
    loaded = load_model(str(tiny["llama"]), dtype="float32")
    spec = model_spec(loaded, from_ids([[3, 17, 5, 9, 31, 2, 11] * 5], loaded.config))
    verdict = inject(spec, "rope-low-precision", dtype="float32", check="all")
    assert verdict.status == "caught" and {"ATT-W240", "ATT-W247"} <= set(verdict.codes)
    fused = inject(spec, "fused-qkv-split-under-gqa", dtype="float32")
    (error,) = fused.shape_error
    assert error.code == "ATT-E103" and "(32 columns: 4+2·2 heads of 4) → chunk(3): part 1, 11 columns" in \
        error.operands[0].origin


# =========================================================================== padding bugs on a batch of texts

@pytest.fixture(scope="module")
def minilm():
    minilm_folder()                 # skips, or fails under CI=true, when the package is not installed
    return MINILM


def test_nan_leak_on_minilm_with_a_batch_of_texts(minilm):
    spec = {"model": minilm, "text": TEXTS, "layers": "0-1"}
    verdict = inject(spec, "nan-leak-through-mask", dtype="float32")
    assert verdict.status == "caught" and {"ATT-W246", "ATT-W204"} <= set(verdict.codes)
    assert verdict.fix_check["verified"]
    weak = inject(spec, "weak-mask-value", dtype="float32")      # right padding, no row fully masked
    assert weak.cannot_show is None and weak.codes == ["ATT-W248"] and not _pattern_changed(weak)


def _pattern_changed(verdict):
    hook = "blocks.0.attn.hook_pattern"
    return not np.allclose(verdict.trace[hook], run(verdict.trace.spec, keep=[hook], dtype="float32")[hook])


# =========================================================================== clean models: not a word

@pytest.mark.parametrize("dtype, layers", [("float32", None), ("float64", "0-1")])     # float64: two layers, to
def test_minilm_has_no_false_alarm_and_agrees_with_sdpa(minilm, dtype, layers):        # keep this file quick
    trace = run({"model": minilm, "text": TEXTS, **({"layers": layers} if layers else {})}, check="all", dtype=dtype)
    assert trace.warnings == [], [d.message for d in trace.warnings]
    assert {d.code for d in trace.diagnoses} <= {"ATT-I300", "ATT-I301"}
    assert any(c.startswith("an independent float64 recomputation agrees") and
               (f"{'float64' if dtype == 'float64' else 'float32'} rounding") in c for c in trace.checks_passed)
    assert any("scaled_dot_product_attention" in c for c in trace.checks_passed)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
def test_tiny_models_have_no_false_alarm(tiny, name):
    spec = {"model": str(tiny[name]), "ids": [[3, 17, 5, 9, 31, 2, 11], [8, 1, 25, 4]]}      # right-padded
    trace = run(spec, check="all")
    loading = {"ATT-W302", "ATT-W303"}          # the loader's notes on the checkpoint (no lm_head, no pad token)
    assert [d for d in trace.warnings if d.code not in loading] == [], [d.message for d in trace.warnings]
    assert {d.code for d in trace.diagnoses} - loading <= {"ATT-I240"}       # a window over trailing pads
    assert any("scaled_dot_product_attention" in c and "float32 rounding" in c for c in trace.checks_passed)


def test_sdpa_crosscheck_reports_a_backend_difference(tiny):
    spec = {"model": str(tiny["llama"]), "ids": [[3, 17, 5, 9, 31, 2, 11]]}
    trace = run(spec, keep="all")
    arrays = dict(trace.arrays)
    arrays["blocks.1.attn.hook_z"] = arrays["blocks.1.attn.hook_z"] * np.float32(1.001)   # float16-sized
    (warning,) = torch_sdpa_crosscheck(trace.spec, trace, arrays)
    assert warning.code == "ATT-W247" and warning.hook == "blocks.1.attn.hook_z"
    assert "scaled_dot_product_attention" in warning.message and "the size of float16 rounding" in warning.message
    assert torch_sdpa_crosscheck(trace.spec, trace, dict(trace.arrays)) == []


# =========================================================================== a capture names it

class HalfSoftmaxAttention(torch.nn.Module):
    """Seed 004's multi-head attention with the softmax written out, as exp / sum, run in float16."""

    def __init__(self, d_model, heads):
        super().__init__()
        self.heads, self.d_k = heads, d_model // heads
        self.W_q, self.W_k, self.W_v, self.W_o = (torch.nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x):
        import attntrace
        b = x.size(0)
        q, k, v = (w(x).view(b, -1, self.heads, self.d_k).transpose(1, 2) for w in (self.W_q, self.W_k, self.W_v))
        scores = attntrace.tap("scaled", q @ k.transpose(-2, -1) / self.d_k ** 0.5)
        weights = attntrace.tap("weights", torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True))
        context = (weights @ v).transpose(1, 2).contiguous().view(b, -1, self.heads * self.d_k)
        return attntrace.tap("output", self.W_o(context))


def test_a_capture_of_a_float16_softmax_is_named(tmp_path):
    from attntrace.analysis.capture import check_capture
    from attntrace.models.capture import capture
    torch.manual_seed(3)
    module = HalfSoftmaxAttention(24, 4).eval().half()
    with torch.no_grad():
        for w in (module.W_q, module.W_k):
            w.weight.mul_(4)                                            # sharp scores: some exp() overflow
    x = torch.randn(2, 5, 24).half()
    path = tmp_path / "half_softmax.safetensors"
    with torch.no_grad(), capture(module, path, weights={"q": module.W_q, "k": module.W_k, "v": module.W_v,
                                                         "o": module.W_o}, heads=4):
        module(x)
    report = check_capture(path)
    assert report.verdict == "differs" and "softmax-in-half-precision" in report.bug_names
