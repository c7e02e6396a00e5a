"""Tiny checkpoints written with numpy only (config.json + model.safetensors), for breaking on purpose.

The tensor names are those transformers saves for the same configs (test_models_transformers
checks that), so the consistency checks are exercised on realistic names without torch.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

DTYPE_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64", np.dtype("i1"): "I8"}

CONFIGS = {
    "bert": {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8, "num_attention_heads": 2,
             "num_hidden_layers": 2, "intermediate_size": 12, "vocab_size": 20, "max_position_embeddings": 16,
             "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 8, "n_head": 2, "n_layer": 2,
             "n_positions": 16, "vocab_size": 20, "activation_function": "gelu_new", "bos_token_id": 1,
             "eos_token_id": 2, "tie_word_embeddings": True},
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "num_hidden_layers": 2,
              "intermediate_size": 12, "vocab_size": 20, "max_position_embeddings": 32, "rms_norm_eps": 1e-6,
              "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}


def tensor_shapes(family: str, cfg: dict) -> dict:
    """Checkpoint name -> shape, as transformers names them for ``cfg``."""
    if family == "bert":
        d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        shapes = {"embeddings.word_embeddings.weight": (v, d),
                  "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], d),
                  "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], d),
                  "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
                  "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"):
                shapes.update({p + name + ".weight": (d, d), p + name + ".bias": (d,)})
            shapes.update({p + "intermediate.dense.weight": (f, d), p + "intermediate.dense.bias": (f,),
                           p + "output.dense.weight": (d, f), p + "output.dense.bias": (d,)})
            for name in ("attention.output.LayerNorm", "output.LayerNorm"):
                shapes.update({p + name + ".weight": (d,), p + name + ".bias": (d,)})
        return shapes
    if family == "gpt2":
        d, v = cfg["n_embd"], cfg["vocab_size"]
        shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (cfg["n_positions"], d),
                  "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
        for i in range(cfg["n_layer"]):
            p = f"transformer.h.{i}."
            shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,),
                           p + "ln_2.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                           p + "attn.c_attn.bias": (3 * d,),
                           p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                           p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
                           p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)})
        return shapes
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
        if cfg.get("attention_bias"):
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (d,)})
    return shapes


def random_tensors(family: str, cfg: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in tensor_shapes(family, cfg).items()}


def save_tensors(path: Path, tensors: dict) -> Path:
    """A minimal safetensors writer (test-only): header, then the arrays' bytes in order."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        array = array.astype(array.dtype.newbyteorder("<"))
        raw = array.tobytes()
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    return path


def write_checkpoint(folder: Path, family: str, config_changes: dict = None, tensors: dict = None,
                     edit=None, seed: int = 0) -> Path:
    """A checkpoint folder; ``edit(tensors)`` may add, drop or replace tensors before saving."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**CONFIGS[family], **(config_changes or {})}
    tensors = dict(tensors if tensors is not None else random_tensors(family, CONFIGS[family], seed))
    if edit:
        edit(tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_tensors(folder / "model.safetensors", tensors)
    return folder
