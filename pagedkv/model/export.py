"""Write a model as a Hugging Face checkpoint folder (``config.json`` + ``model.safetensors``), the inverse of
:func:`pagedkv.model.load_checkpoint`: fused ``[in, out]`` weights split back into HF's ``[out, in]`` tensors.

Used by experiments (a random model saved, then served from disk) and tests. ``kv_scales`` adds fp8 KV-cache
scales under vLLM's names (``model.layers.N.self_attn.k_scale`` / ``v_scale``, see :mod:`.kv_scales`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..backend import dtype_of, to_numpy
from .config import ModelConfig
from .safetensors import save_file
from .weights import ModelWeights


def hf_tensors(config: ModelConfig, weights: ModelWeights, dtype="float32") -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint by Hugging Face name, on the host, in ``dtype``."""
    nq, nkv, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    t = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = to_numpy(weights.lm_head).T
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = lw.input_norm, lw.post_norm
        wqkv = to_numpy(lw.wqkv)
        bqkv = None if lw.bqkv is None else to_numpy(lw.bqkv)
        for name, (a, b) in zip("qkv", ((0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv))):
            t[p + f"self_attn.{name}_proj.weight"] = wqkv[:, a:b].T
            if bqkv is not None:
                t[p + f"self_attn.{name}_proj.bias"] = bqkv[a:b]
        t[p + "self_attn.o_proj.weight"] = to_numpy(lw.wo).T
        gate_up = to_numpy(lw.w_gate_up)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = gate_up[:, :inter].T, gate_up[:, inter:].T
        t[p + "mlp.down_proj.weight"] = to_numpy(lw.w_down).T
    dt = dtype_of(dtype)
    return {k: np.ascontiguousarray(to_numpy(v).astype(dt)) for k, v in t.items()}


def hf_config(config: ModelConfig, dtype="float32") -> dict:
    """``config.json`` for ``config`` (Qwen2 when it has q/k/v biases, else Llama)."""
    hf = {"architectures": ["Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"],
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
          "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
          "tie_word_embeddings": config.tie_word_embeddings,
          "max_position_embeddings": config.max_position_embeddings, "torch_dtype": str(dtype_of(dtype))}
    if config.rope_llama3_scaling is not None:
        factor, low, high, original = config.rope_llama3_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                              "high_freq_factor": high, "original_max_position_embeddings": original}
    return hf


def save_checkpoint(folder, config: ModelConfig, weights: ModelWeights, *, dtype="float32",
                    kv_scales: tuple | None = None) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``; ``kv_scales = (k_scales, v_scales)`` per
    layer adds the fp8 KV scale tensors (float32 scalars)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(config, weights, dtype)
    if kv_scales is not None:
        for layer, (k, v) in enumerate(zip(*kv_scales)):
            tensors[f"model.layers.{layer}.self_attn.k_scale"] = np.array(k, dtype=np.float32)
            tensors[f"model.layers.{layer}.self_attn.v_scale"] = np.array(v, dtype=np.float32)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype)))
    return folder
