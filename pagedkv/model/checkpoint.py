"""Load a local Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``) without torch.

Supported architectures: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (q/k/v biases), bf16/fp16/fp32
tensors. Hugging Face ``nn.Linear`` weights are ``[out, in]``; they are transposed to ``[in, out]`` and
q|k|v and gate|up are fused (see :mod:`pagedkv.model.weights`).

Nothing is copied until everything is checked: the config's fields (:mod:`pagedkv.model.hf_config`), every
file's header (:mod:`pagedkv.model.safetensors`), and every tensor's name, dtype and shape against the
config (``expected_shapes``): a missing, unexpected or misshapen tensor, a layer the config does not have, or
a name in two files raises ``ValueError`` naming it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..backend import dtype_of, get_backend
from .config import ModelConfig
from .hf_config import ARCHITECTURES, config_from_hf, read_json_object, torch_dtype
from .kv_scales import is_kv_scale
from .safetensors import load_file
from .weights import LayerWeights, ModelWeights

__all__ = ["ARCHITECTURES", "checkpoint_dtype", "config_from_hf", "expected_shapes", "load_checkpoint"]

FLOAT_DTYPES = (np.dtype("<f8"), np.dtype("<f4"), np.dtype("<f2"), dtype_of("bfloat16"))
# buffers some checkpoints carry that the model recomputes (old Llama exports saved the rotary table)
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
LAYER = re.compile(r"model\.layers\.(\d+)\.")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, by Hugging Face name, with its ``[out, in]`` shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def check_tensors(tensors: dict[str, np.ndarray], config: ModelConfig, folder) -> None:
    """Names, dtypes and shapes of ``tensors`` against ``config``; the first problem raises ``ValueError``."""
    want = expected_shapes(config)
    extra_layers = sorted({int(m.group(1)) for name in tensors if (m := LAYER.match(name))
                           and int(m.group(1)) >= config.num_layers})
    if extra_layers:
        raise ValueError(f"checkpoint {folder} has tensors of layer {extra_layers[0]} but config.json "
                         f"num_hidden_layers is {config.num_layers}")
    missing = [name for name in want if name not in tensors]
    if missing:
        raise ValueError(f"checkpoint {folder} is missing tensor {missing[0]!r} ({len(missing)} missing)")
    for name in (n for n in tensors if n not in want):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            want[name] = (config.vocab_size, config.hidden_size)  # NOTE: unused (tied), but it must fit
        elif not IGNORED.fullmatch(name) and not is_kv_scale(name):  # fp8 KV scales: model/kv_scales.py
            raise ValueError(f"checkpoint {folder} has tensor {name!r}, which a {_describe(config)} model "
                             "does not have")
    for name, want_shape in want.items():  # in model order: the embedding first, then layer by layer
        a = tensors[name]
        if a.dtype not in FLOAT_DTYPES:
            raise ValueError(f"checkpoint {folder}: tensor {name!r} has dtype {a.dtype}; only float64/32/16 and "
                             "bfloat16 weights load (quantized checkpoints are not supported)")
        if tuple(a.shape) != want_shape:
            raise ValueError(f"checkpoint {folder}: tensor {name!r} has shape {list(a.shape)} but config.json "
                             f"implies {list(want_shape)}")


def _describe(config: ModelConfig) -> str:
    return ("tied" if config.tie_word_embeddings else "untied") + (", q/k/v-biased" if config.qkv_bias else "")


def checkpoint_dtype(hf: dict, tensors: dict[str, np.ndarray], folder) -> np.dtype:
    """The dtype the checkpoint's authors chose: ``dtype`` / ``torch_dtype`` of config.json, else the dtype
    holding most of its tensors' bytes. One the engine cannot run (float64, "auto") raises ``ValueError``."""
    name, source = torch_dtype(hf, f"{folder}/config.json"), f"{folder}/config.json names dtype"
    if name is None:
        nbytes: dict[np.dtype, int] = {}
        for a in tensors.values():
            nbytes[a.dtype] = nbytes.get(a.dtype, 0) + a.nbytes
        name, source = max(nbytes, key=nbytes.get), f"checkpoint {folder}: its tensors are mostly"
    try:
        return dtype_of(name)
    except ValueError:
        raise ValueError(f"{source} {str(name)!r}, not one the engine runs (float16, bfloat16, float32); "
                         "pass dtype= to convert") from None


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {folder}")
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for f in files:
        for name, a in load_file(f).items():  # memory-mapped: nothing is copied here
            if name in tensors:
                raise ValueError(f"checkpoint {folder}: tensor {name!r} is in both {where[name].name} and {f.name}")
            tensors[name], where[name] = a, f
    return tensors


class _Tensors:
    """Checked tensors → the backend in one dtype."""

    def __init__(self, tensors, dtype, xp, folder, allow_non_finite=False):
        self.tensors, self.dtype, self.xp = tensors, dtype, xp
        self.folder, self.allow_non_finite = folder, allow_non_finite

    def host(self, name, transpose=False):
        a = self.tensors[name].astype(self.dtype)
        if not self.allow_non_finite and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise ValueError(f"checkpoint {self.folder}: tensor {name!r} holds {bad} non-finite values (NaN or inf) "
                             "in the load dtype; load_checkpoint(..., allow_non_finite=True) to load it anyway")
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


def load_checkpoint(folder, dtype=None, *, device="auto",
                    allow_non_finite: bool = False) -> tuple[ModelConfig, ModelWeights]:
    """Read ``folder/config.json`` and every ``folder/*.safetensors``.

    Args:
        dtype: the weights' dtype; None (default) keeps the checkpoint's own (``dtype`` / ``torch_dtype`` of
            config.json, else its tensors'): a bfloat16 checkpoint stays bfloat16.
        device: ``"auto" | "gpu" | "cpu"`` or a :class:`pagedkv.backend.Backend`.
        allow_non_finite: load tensors holding NaN or inf (refused by default: every request would decode
            garbage).
    Returns:
        ``(config, weights)`` with the weights on ``device``'s backend.
    Raises:
        ValueError: no config.json, a malformed, unsupported or absurdly large (``hf_config.MAX_SIZES``) config
            field, a non-finite weight, a bad safetensors file
            (``SafetensorsError``), a tensor missing, unexpected or of the wrong shape, before any copy.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json")
    hf = read_json_object(folder / "config.json")
    source = f"{folder / 'config.json'}"
    config_from_hf(hf, source=source)  # NOTE: the config is checked before any file is opened
    tensors = _read_tensors(folder)
    config = config_from_hf(hf, tied_default="lm_head.weight" not in tensors, source=source)
    check_tensors(tensors, config, folder)
    target = dtype_of(dtype) if dtype is not None else checkpoint_dtype(hf, tensors, folder)
    backend = get_backend(device) if isinstance(device, str) else device
    t = _Tensors(tensors, target, backend.xp, folder, allow_non_finite)
    layers = [_layer(t, i, config) for i in range(config.num_layers)]
    embed = t.get("model.embed_tokens.weight")
    lm_head = embed.T if config.tie_word_embeddings else t.get("lm_head.weight", transpose=True)
    weights = ModelWeights(embed=embed, layers=layers, final_norm=t.get("model.norm.weight"), lm_head=lm_head,
                           tied=config.tie_word_embeddings)
    return config, weights
