"""Load a local Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``) without torch.

Supported architectures: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (q/k/v biases), bf16/fp16/fp32
tensors. Hugging Face ``nn.Linear`` weights are ``[out, in]``; they are transposed to ``[in, out]`` and
q|k|v and gate|up are fused (see :mod:`pagedkv.model.weights`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..backend import dtype_of, get_backend
from .config import ModelConfig
from .safetensors import load_file
from .weights import LayerWeights, ModelWeights

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """``(theta, llama3 scaling or None)`` from ``rope_theta`` / ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        return theta, (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                       float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    raise ValueError(f"unsupported rope scaling type {rope_type!r} (only 'default' and 'llama3' are implemented)")


def config_from_hf(hf: dict, *, tied_default: bool = False) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict; unsupported architectures raise ``ValueError``."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {ARCHITECTURES}")
    for key, ok in (("mlp_bias", not hf.get("mlp_bias")), ("use_sliding_window", not hf.get("use_sliding_window")),
                    ("hidden_act", hf.get("hidden_act", "silu") == "silu")):
        if not ok:
            raise ValueError(f"unsupported {key}={hf.get(key)!r}")
    heads = int(hf["num_attention_heads"])
    theta, llama3 = _rope(hf)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        intermediate_size=int(hf["intermediate_size"]), rope_theta=theta, rope_llama3_scaling=llama3,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", tied_default)),
        qkv_bias=archs[0] == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
    )


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {folder}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _checkpoint_dtype(hf: dict, dtype):
    if dtype is not None:
        return dtype_of(dtype)
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    try:
        return dtype_of(name)
    except ValueError:
        return dtype_of("float32")


class _Tensors:
    """Named tensors → the backend in one dtype; a missing name raises ``ValueError`` naming it."""

    def __init__(self, tensors, dtype, xp, folder):
        self.tensors, self.dtype, self.xp, self.folder = tensors, dtype, xp, folder

    def host(self, name, transpose=False):
        if name not in self.tensors:
            raise ValueError(f"checkpoint {self.folder} is missing tensor {name!r}")
        a = np.asarray(self.tensors[name]).astype(self.dtype)
        return a.T if transpose else a

    def get(self, *names, transpose=False, axis=-1):
        parts = [self.host(n, transpose) for n in names]
        return self.xp.asarray(np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis)))


def _layer(t: _Tensors, i: int, config: ModelConfig) -> LayerWeights:
    p = f"model.layers.{i}."
    qkv = [p + f"self_attn.{n}_proj" for n in "qkv"]
    return LayerWeights(
        input_norm=t.get(p + "input_layernorm.weight"),
        wqkv=t.get(*(n + ".weight" for n in qkv), transpose=True),
        bqkv=t.get(*(n + ".bias" for n in qkv)) if config.qkv_bias else None,
        wo=t.get(p + "self_attn.o_proj.weight", transpose=True),
        post_norm=t.get(p + "post_attention_layernorm.weight"),
        w_gate_up=t.get(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", transpose=True),
        w_down=t.get(p + "mlp.down_proj.weight", transpose=True),
    )


def load_checkpoint(folder, *, dtype=None, device="auto") -> tuple[ModelConfig, ModelWeights]:
    """Read ``folder/config.json`` and every ``folder/*.safetensors``.

    Args:
        dtype: weights' dtype (default: the checkpoint's ``dtype`` / ``torch_dtype``, else float32).
    Returns:
        ``(config, weights)`` with the weights on ``device``'s backend.
    Raises:
        ValueError: no config.json, an unsupported architecture or option, a missing tensor.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json")
    hf = json.loads((folder / "config.json").read_text())
    tensors = _read_tensors(folder) if hf.get("architectures", [None])[0] in ARCHITECTURES else {}
    config = config_from_hf(hf, tied_default="lm_head.weight" not in tensors)
    backend = get_backend(device) if isinstance(device, str) else device
    t = _Tensors(tensors, _checkpoint_dtype(hf, dtype), backend.xp, folder)
    layers = [_layer(t, i, config) for i in range(config.num_layers)]
    embed = t.get("model.embed_tokens.weight")
    lm_head = embed.T if config.tie_word_embeddings else t.get("lm_head.weight", transpose=True)
    weights = ModelWeights(embed=embed, layers=layers, final_norm=t.get("model.norm.weight"), lm_head=lm_head,
                           tied=config.tie_word_embeddings)
    return config, weights
