"""The benchmarks' profile helpers time what the engine runs (experiments/engine_bench.py), on the CPU.

``profile_prefill`` reports a prefill forward and the share of its attention. Before stop 27 the attention time
came from the dense padded ``varlen_causal_attention``, a path the engine's forward does not take (on a GPU it
runs the paged prefill kernel; on the CPU the float64 reference), so the W1 logs showed an "attention" five
times longer than the whole forward.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import engine_bench  # noqa: E402


@pytest.fixture
def engine():
    from pagedkv.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model="tiny", device="cpu", dtype="float32", block_size=16, num_blocks=64,
                                  max_model_len=256))


def test_profile_prefill_times_the_attention_path_the_forward_runs(engine, monkeypatch):
    import pagedkv.model.layers as layers

    backend = engine.model.attention
    paths = {"forward": [], "attention": []}
    phase = ["forward"]
    real_attend = type(backend)._attend

    def spy_attend(self, layer, q, k, v, meta):
        paths[phase[0]].append(meta.path)
        return real_attend(self, layer, q, k, v, meta)

    dense = []
    real_varlen = layers.varlen_causal_attention
    monkeypatch.setattr(type(backend), "_attend", spy_attend)
    monkeypatch.setattr(layers, "varlen_causal_attention", lambda *a, **k: dense.append(1) or real_varlen(*a, **k))
    real_prefill = engine.model.prefill

    def prefill(batch, kv_cache):  # the forward's own attention calls are "forward", the rest "attention"
        phase[0] = "forward"
        try:
            return real_prefill(batch, kv_cache)
        finally:
            phase[0] = "attention"
    monkeypatch.setattr(engine.model, "prefill", prefill)
    free_before = engine.manager.num_free_blocks
    prompts = [(np.arange(40) * 7 % 50 + 1).tolist(), (np.arange(23) * 3 % 50 + 1).tolist()]
    out = engine_bench.profile_prefill(engine, prompts)

    assert out["prefill_tokens"] == 63 and out["prefill_forward_s"] > 0 and out["prefill_attention_s"] > 0
    assert paths["forward"] and paths["attention"], paths
    assert set(paths["attention"]) == set(paths["forward"]), paths  # the same path as the forward
    assert len(paths["attention"]) % engine.model_config.num_layers == 0  # every layer, whole forwards' worth
    assert not dense, "timed the dense padded attention, which the forward does not run"
    assert engine.manager.num_free_blocks == free_before  # the profile's sequences are freed


def test_gemms_put_the_lm_head_on_its_own_rows(engine, monkeypatch):
    """A prefill's logits are its last rows only: ``_gemms(engine, n, head_rows=1)`` multiplies the LM head once
    per sequence, every other weight at ``n`` rows."""
    shapes = []
    monkeypatch.setattr(engine.model, "matmul", lambda x, w: shapes.append((x.shape[0], w.shape)) or x[:, :1])
    engine_bench._gemms(engine, 48, head_rows=1)()
    head = engine.model.weights.lm_head.shape
    assert (1, head) in shapes and all(rows == 48 for rows, w in shapes if w != head)
    assert len(shapes) == 4 * engine.model_config.num_layers + 1


def test_ttft_breakdown_on_the_cpu_adds_up(tmp_path):
    """experiments.ttft_breakdown: every asked length, rest = forward - gemms - attention, host = engine -
    forward, the prompt itself not written, no transformers columns on the CPU."""
    import json

    from experiments import ttft_breakdown

    out = tmp_path / "ttft.json"
    assert ttft_breakdown.main(["--device", "cpu", "--lens", "48", "16", "--runs", "1", "--output-json",
                                str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["prompt_tokens"] for r in rows] == [16, 48] and result["model"] == "tiny"
    for r in rows:
        assert r["engine_s"] > 0 and r["forward_s"] > 0 and r["gemms_s"] > 0 and r["attention_s"] > 0
        assert r["rest_s"] == pytest.approx(r["forward_s"] - r["gemms_s"] - r["attention_s"])
        assert r["host_s"] == pytest.approx(r["engine_s"] - r["forward_s"])
        assert "prompt" not in r and "hf_s" not in r


@pytest.mark.parametrize("argv, expected", [
    (["--lens", "8"], "error: --lens must be in [16, 131072]"),
    (["--runs", "0"], "error: --runs must be in [1, 50]"),
])
def test_ttft_breakdown_bad_flags(argv, expected, capsys):
    from experiments import ttft_breakdown

    with pytest.raises(SystemExit) as info:
        ttft_breakdown.main(["--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err
