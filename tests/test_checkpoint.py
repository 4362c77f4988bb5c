"""The torch-free safetensors reader and the Hugging Face folder loader, on folders written with NumPy."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.model import get_config, load_checkpoint, random_weights
from pagedkv.model.safetensors import load_file, read_header, save_file


def hf_tensors(config, weights, dtype=np.float32):
    """Our fused ``[in, out]`` weights as Hugging Face ``[out, in]`` tensors with HF names."""
    nq, nkv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    t = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = weights.lm_head.T
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = lw.input_norm
        t[p + "post_attention_layernorm.weight"] = lw.post_norm
        for name, (a, b) in zip("qkv", ((0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv))):
            t[p + f"self_attn.{name}_proj.weight"] = lw.wqkv[:, a:b].T
            if lw.bqkv is not None:
                t[p + f"self_attn.{name}_proj.bias"] = lw.bqkv[a:b]
        t[p + "self_attn.o_proj.weight"] = lw.wo.T
        t[p + "mlp.gate_proj.weight"] = lw.w_gate_up[:, :inter].T
        t[p + "mlp.up_proj.weight"] = lw.w_gate_up[:, inter:].T
        t[p + "mlp.down_proj.weight"] = lw.w_down.T
    return {k: np.ascontiguousarray(v).astype(dtype) for k, v in t.items()}


def hf_config(config, arch):
    return {"architectures": [arch], "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "vocab_size": config.vocab_size,
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
            "tie_word_embeddings": config.tie_word_embeddings, "max_position_embeddings": 1024,
            "torch_dtype": "float32"}


def write_folder(path, config, weights, arch="LlamaForCausalLM", dtype=np.float32, shards=2, drop=None):
    tensors = hf_tensors(config, weights, dtype)
    if drop:
        del tensors[drop]
    names = sorted(tensors)
    for s in range(shards):
        save_file({n: tensors[n] for n in names[s::shards]}, path / f"model-{s:05d}.safetensors")
    (path / "config.json").write_text(json.dumps(hf_config(config, arch)))
    return path


def test_safetensors_round_trip_and_layout(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
               "c": np.arange(4, dtype=np.float16), "d": np.array([[7]], dtype=np.int64)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["b"] == {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]}
    assert read_header(tmp_path / "x.safetensors")[1] == 8 + n
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


def test_safetensors_bad_files(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a safetensors"):
        load_file(tmp_path / "short.safetensors")
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match="needs 16"):
        load_file(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("arch, overrides", [
    ("LlamaForCausalLM", {}), ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("Qwen2ForCausalLM", {"qkv_bias": True}),
])
def test_loaded_checkpoint_equals_the_weights_it_was_written_from(tmp_path, arch, overrides):
    config = get_config("tiny", **overrides)
    weights = random_weights(config, seed=5, device="cpu")
    config2, loaded = load_checkpoint(write_folder(tmp_path, config, weights, arch), device="cpu")
    assert (config2.qkv_bias, config2.tie_word_embeddings, config2.num_kv_heads) == \
        (config.qkv_bias, config.tie_word_embeddings, config.num_kv_heads)
    for a, b in zip(weights.layers, loaded.layers):
        for name in ("wqkv", "wo", "w_gate_up", "w_down", "input_norm", "post_norm"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        if config.qkv_bias:
            np.testing.assert_array_equal(a.bqkv, b.bqkv)
    np.testing.assert_array_equal(weights.lm_head, loaded.lm_head)
    engine_cfg = EngineConfig(device="cpu", num_blocks=64, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=8)
    direct = LLMEngine(engine_cfg, model_config=config, weights=weights).generate([[1, 2, 3]], params, progress=False)
    via_folder = LLMEngine.from_checkpoint(tmp_path, engine_cfg).generate([[1, 2, 3]], params, progress=False)
    assert direct[0].outputs == via_folder[0].outputs


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    config = get_config("tiny")
    weights = random_weights(config, seed=2, device="cpu")
    _, loaded = load_checkpoint(write_folder(tmp_path, config, weights, dtype=ml_dtypes.bfloat16), dtype="float32",
                                device="cpu")
    want = weights.layers[0].wo.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(loaded.layers[0].wo, want)


def test_missing_tensor_and_unsupported_architecture(tmp_path):
    config = get_config("tiny")
    weights = random_weights(config, seed=2, device="cpu")
    (tmp_path / "a").mkdir()
    write_folder(tmp_path / "a", config, weights, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(tmp_path / "a", device="cpu")
    (tmp_path / "b").mkdir()
    write_folder(tmp_path / "b", config, weights, arch="MistralForCausalLM")
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        load_checkpoint(tmp_path / "b", device="cpu")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path / "nothing", device="cpu")
    (tmp_path / "c").mkdir()
    write_folder(tmp_path / "c", config, weights)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    for key, value in (("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("hidden_act", "gelu"),
                       ("use_sliding_window", True)):
        (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match="yarn" if key == "rope_scaling" else key):
            load_checkpoint(tmp_path / "c", device="cpu")


def test_llama3_rope_scaling_is_read_and_applied(tmp_path):
    config = get_config("tiny", head_dim=64, num_heads=2, num_kv_heads=1, hidden_size=128)
    weights = random_weights(config, seed=2, device="cpu")
    write_folder(tmp_path, config, weights)
    cfg = json.loads((tmp_path / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_theta": 500000.0, "rope_scaling": scaling}))
    loaded, _ = load_checkpoint(tmp_path, device="cpu")
    assert loaded.rope_llama3_scaling == (32.0, 1.0, 4.0, 8192)
    from pagedkv.model.layers import llama3_inv_freq

    inv = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    out = llama3_inv_freq(inv, 32.0, 1.0, 4.0, 8192)
    wavelen = 2 * np.pi / inv
    np.testing.assert_allclose(out[wavelen < 8192 / 4], inv[wavelen < 8192 / 4], rtol=1e-6)  # short: kept
    np.testing.assert_allclose(out[wavelen > 8192], inv[wavelen > 8192] / 32, rtol=1e-6)  # long: / factor
    assert np.all(np.diff(out) < 0)  # still monotone through the blend


# -- issue 8, finding 4: every tensor's shape against config.json, every config field validated ---------------
def tiny_folder(path, *, config_edit=None, tensor_edit=None, drop_keys=(), **overrides):
    """A tiny Llama folder; ``config_edit`` updates config.json, ``tensor_edit(tensors)`` edits the tensors."""
    config = get_config("tiny", **overrides)
    weights = random_weights(config, seed=3, device="cpu")
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(config, weights)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, path / "model.safetensors")
    cfg = {**hf_config(config, "LlamaForCausalLM"), **(config_edit or {})}
    for key in drop_keys:
        cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _resize(name, shape):
    def edit(t):
        t[name] = np.zeros(shape, dtype=np.float32)
    return edit


@pytest.mark.parametrize("config_edit, tensor_edit, fragment", [
    ({"vocab_size": 128}, None, "'model.embed_tokens.weight' has shape [256, 64]"),  # loaded, emitted ids >= 128
    ({"vocab_size": 512}, None, "'model.embed_tokens.weight' has shape [256, 64]"),  # loaded, IndexError later
    ({"head_dim": 8}, None, "'model.layers.0.self_attn.q_proj.weight' has shape [64, 64]"),
    ({"num_key_value_heads": 1}, None, "'model.layers.0.self_attn.k_proj.weight' has shape [32, 64]"),
    ({"intermediate_size": 96}, None, "'model.layers.0.mlp.gate_proj.weight' has shape [128, 64]"),
    ({"num_hidden_layers": 1}, None, "has tensors of layer 1 but config.json num_hidden_layers is 1"),  # truncated
    ({"num_hidden_layers": 3}, None, "missing tensor 'model.layers.2."),
    (None, _resize("model.norm.weight", (1,)), "'model.norm.weight' has shape [1]"),  # broadcast silently
    (None, _resize("model.layers.1.input_layernorm.weight", (1,)), "input_layernorm.weight' has shape [1]"),
    (None, _resize("lm_head.weight", (256, 32)), "'lm_head.weight' has shape [256, 32]"),
    (None, _resize("model.layers.0.self_attn.q_proj.bias", (64,)), "has tensor 'model.layers.0.self_attn.q_proj.bias'"),
    ({"tie_word_embeddings": True}, _resize("lm_head.weight", (1, 64)), "'lm_head.weight' has shape [1, 64]"),
])
def test_tensor_shapes_are_checked_against_the_config(tmp_path, config_edit, tensor_edit, fragment):
    folder = tiny_folder(tmp_path / "ckpt", config_edit=config_edit, tensor_edit=tensor_edit)
    with pytest.raises(ValueError) as info:
        load_checkpoint(folder, device="cpu")
    assert fragment in str(info.value)


def test_shapes_are_checked_before_any_copy(tmp_path, monkeypatch):
    from pagedkv.model import checkpoint

    copies = []
    real = checkpoint._Tensors.get
    monkeypatch.setattr(checkpoint._Tensors, "get", lambda self, *a, **k: copies.append(a) or real(self, *a, **k))
    folder = tiny_folder(tmp_path / "ckpt", tensor_edit=_resize("model.norm.weight", (7,)))
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_checkpoint(folder, device="cpu")
    assert copies == []  # the old loader converted every layer (and the embedding) before failing


def test_tensor_names_dtypes_and_shards_are_checked(tmp_path):
    folder = tiny_folder(tmp_path / "int", tensor_edit=lambda t: t.update(
        {"model.norm.weight": np.ones(64, dtype=np.int32)}))
    with pytest.raises(ValueError, match="dtype int32"):
        load_checkpoint(folder, device="cpu")
    folder = tiny_folder(tmp_path / "dup")
    save_file({"model.norm.weight": np.ones(64, np.float32)}, folder / "model-extra.safetensors")
    with pytest.raises(ValueError, match="'model.norm.weight' is in both"):
        load_checkpoint(folder, device="cpu")
    folder = tiny_folder(tmp_path / "inv", tensor_edit=lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    load_checkpoint(folder, device="cpu")  # a buffer old exports carry: ignored


NAN, INF = float("nan"), float("inf")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}


@pytest.mark.parametrize("edit, drop, field", [
    ({"rope_theta": NAN}, (), "rope_theta"), ({"rope_theta": INF}, (), "rope_theta"),
    ({"rope_theta": -1.0}, (), "rope_theta"), ({"rms_norm_eps": NAN}, (), "rms_norm_eps"),
    ({"rms_norm_eps": 0}, (), "rms_norm_eps"), ({"rope_scaling": {**LLAMA3, "factor": 0.0}}, (), "factor"),
    ({"rope_scaling": {**LLAMA3, "factor": -8.0}}, (), "factor"),
    ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, (), "high_freq_factor"),
    ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}}, (), "low_freq_factor"),
    ({"rope_scaling": [1, 2]}, (), "rope_scaling"), ({"rope_parameters": {"rope_theta": NAN}}, ("rope_theta",),
                                                     "rope_theta"),
    ({"num_key_value_heads": 0}, (), "num_key_value_heads"),  # was read as "absent"
    ({"num_key_value_heads": 3}, (), "num_key_value_heads"), ({"num_attention_heads": 0}, (), "num_attention_heads"),
    ({}, ("num_attention_heads",), "num_attention_heads"), ({}, ("vocab_size",), "vocab_size"),
    ({"vocab_size": "256"}, (), "vocab_size"), ({"vocab_size": [256]}, (), "vocab_size"),
    ({"vocab_size": True}, (), "vocab_size"), ({"vocab_size": 256.5}, (), "vocab_size"),
    ({"hidden_size": 63}, (), "hidden_size"), ({"head_dim": 15}, (), "head_dim"), ({"head_dim": 0}, (), "head_dim"),
    ({"architectures": []}, (), "architectures"), ({"architectures": "LlamaForCausalLM"}, (), "architectures"),
    ({"tie_word_embeddings": "no"}, (), "tie_word_embeddings"), ({"max_position_embeddings": -1}, (),
                                                                  "max_position_embeddings"),
    ({"torch_dtype": 16}, (), "torch_dtype"), ({"torch_dtype": "float64"}, (), "float64"),
    ({"partial_rotary_factor": 0.5}, (), "partial_rotary_factor"),
])
def test_malformed_configs_raise_value_error_naming_the_field(tmp_path, edit, drop, field):
    folder = tiny_folder(tmp_path / "ckpt", config_edit=edit, drop_keys=drop)
    with pytest.raises(ValueError) as info:  # never IndexError, KeyError, ZeroDivisionError, TypeError
        load_checkpoint(folder, device="cpu")
    assert type(info.value) is ValueError and field in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize("text", ["[]", "7", "{", "null", ""])
def test_config_json_must_be_an_object(tmp_path, text):
    folder = tiny_folder(tmp_path / "ckpt")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(folder, device="cpu")


@pytest.mark.parametrize("kwargs, field", [
    ({"rope_theta": NAN}, "rope_theta"), ({"rope_theta": INF}, "rope_theta"), ({"rms_norm_eps": NAN}, "rms_norm_eps"),
    ({"rms_norm_eps": -INF}, "rms_norm_eps"), ({"vocab_size": True}, "vocab_size"), ({"qkv_bias": 1}, "qkv_bias"),
    ({"rope_llama3_scaling": (0.0, 1.0, 4.0, 8192)}, "rope_llama3_scaling"),
    ({"rope_llama3_scaling": (8.0, 1.0, 1.0, 8192)}, "rope_llama3_scaling"),
    ({"rope_llama3_scaling": (8.0, NAN, 4.0, 8192)}, "rope_llama3_scaling"),
])
def test_model_config_checks_finiteness_and_types(kwargs, field):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **kwargs)


# -- issue 9, item 0: the checkpoint's own dtype, no silent float32 upcast -------------------------------------------
@pytest.mark.parametrize("key", ["torch_dtype", "dtype", None])
def test_default_dtype_is_the_checkpoints(tmp_path, key):
    bf16 = np.dtype(ml_dtypes.bfloat16)
    cast = lambda t: t.update({k: v.astype(bf16) for k, v in t.items()})  # noqa: E731
    edit = {"torch_dtype": None, **({key: "bfloat16"} if key else {})}
    folder = tiny_folder(tmp_path / "ckpt", tensor_edit=cast, config_edit=edit)
    _, weights = load_checkpoint(folder, device="cpu")
    assert weights.embed.dtype == bf16 and weights.layers[0].wqkv.dtype == bf16
    _, weights = load_checkpoint(folder, "float32", device="cpu")  # an explicit dtype still converts
    assert weights.embed.dtype == np.float32
