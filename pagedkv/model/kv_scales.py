"""KV-cache scales a checkpoint carries for an fp8 cache: one K and one V scale per layer, under the names
vLLM reads.

    model.layers.N.self_attn.k_scale            model.layers.N.self_attn.v_scale
    model.layers.N.self_attn.k_proj.k_scale     model.layers.N.self_attn.v_proj.v_scale
    model.layers.N.self_attn.attn.k_scale       model.layers.N.self_attn.attn.v_scale
    model.layers.N.self_attn.kv_scale           (one scale for K and V: older fp8 exports)

Each is a scalar (shape ``[]`` or ``[1]``), a float, finite and > 0; anything else raises ``ValueError``
naming the tensor, before the cache exists. A layer without one keeps 1.0 (as vLLM does).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..fp8 import check_scale
from .safetensors import load_file

SCALE_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:(?:k_proj|v_proj|attn)\.)?(k_scale|v_scale|kv_scale)")


def is_kv_scale(name: str) -> bool:
    """Whether ``name`` is a KV-cache scale tensor (the checkpoint check lets these through)."""
    return SCALE_NAME.fullmatch(name) is not None


def kv_scales_of(tensors: dict, num_layers: int, source) -> tuple[np.ndarray, np.ndarray] | None:
    """``(k_scales, v_scales)``, float32 ``[num_layers]``, from checkpoint tensors; None when it has none."""
    k, v = np.ones(num_layers, np.float32), np.ones(num_layers, np.float32)
    found = False
    for name in sorted(tensors):
        m = SCALE_NAME.fullmatch(name)
        if m is None:
            continue
        layer, kind = int(m.group(1)), m.group(2)
        if layer >= num_layers:
            raise ValueError(f"checkpoint {source}: {name!r} names layer {layer} of a {num_layers}-layer model")
        a = np.asarray(tensors[name])
        if a.size != 1 or a.ndim > 1 or a.dtype.kind != "f":
            raise ValueError(f"checkpoint {source}: {name!r} must be one float, got shape {list(a.shape)} {a.dtype}")
        value = check_scale(name, float(a.reshape(-1)[0].astype(np.float64)))
        if kind in ("k_scale", "kv_scale"):
            k[layer] = value
        if kind in ("v_scale", "kv_scale"):
            v[layer] = value
        found = True
    return (k, v) if found else None


def load_kv_scales(folder, num_layers: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The KV scales of every ``folder/*.safetensors`` (memory-mapped; only the scale tensors are read)."""
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update({n: a for n, a in load_file(f).items() if is_kv_scale(n)})
    return kv_scales_of(tensors, num_layers, folder)
