"""Smoke runs of the experiments with tiny sizes on the CPU: their verdicts as counts (never wall-clock),
their JSON, their plots, and the one-line error of a bad flag."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("experiments") is None:  # plain `pytest` (not `python -m pytest`) from elsewhere
    sys.path.insert(0, str(ROOT))

from experiments import memory_share, plots, throughput

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_json(main, args, tmp_path, name="out.json"):
    path = tmp_path / name
    assert main(args + ["--device", "cpu", "--output-json", str(path)]) == 0
    return json.loads(path.read_text())


# -- memory_share ------------------------------------------------------------------------------------------
MEMORY_ARGS = ["--num-requests", "4", "--num-branches", "3", "--prompt-len", "37", "--suffix-len", "5",
               "--gen-len", "3", "--block-size", "8"]


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return run_json(memory_share.main, MEMORY_ARGS, tmp_path_factory.mktemp("memory"))


def test_memory_share_saves_memory_with_identical_outputs(memory):
    for r in memory["scenarios"]:
        assert r["saved_pct"] > 0
        assert r["shared"]["num_used_blocks"] < r["naive"]["num_used_blocks"]
        assert r["outputs"]["identical"] and r["outputs"]["max_abs_diff"] == 0.0
        assert r["outputs"]["num_outputs"] == r["scenario"]["num_requests"] * 2 * 3  # requests x layers x steps


def test_memory_share_counts_blocks_and_copies_exactly(memory):
    prompt, parallel = memory["scenarios"]
    # 37 + 5 + 3 = 45 tokens = 6 blocks of 8 per request; the prompt is 4 full blocks + 1 partial block
    assert prompt["naive"]["num_used_blocks"] == 4 * 6
    assert prompt["shared"]["num_used_blocks"] == 5 + 4 * 2  # prompt once + (copied partial block + 1 new) each
    assert prompt["shared"]["num_cow_copies"] == 4 and prompt["naive"]["num_cow_copies"] == 0
    assert prompt["shared"]["num_shared_blocks"] == 4
    # 3 branches of 37 + 3 = 40 tokens = 5 blocks; the last branch to diverge keeps the partial block: 2 copies
    assert parallel["naive"]["num_used_blocks"] == 3 * 5
    assert parallel["shared"]["num_used_blocks"] == 5 + 2
    assert parallel["shared"]["num_cow_copies"] == 2
    assert prompt["naive"]["peak_used_blocks"] == max(prompt["timeline_used_blocks"]["naive"])


def test_memory_share_model_check_gives_identical_tokens(memory):
    for r in memory["scenarios"]:
        mc, sc = r["model_check"], r["scenario"]
        assert mc["ran"] and mc["identical"] and mc["tokens_identical"] and mc["max_abs_logit_diff"] == 0.0
        assert mc["num_tokens"] == sc["num_requests"] * (sc["gen_len"] + 1)
        assert mc["shared_cow_copies"] == r["shared"]["num_cow_copies"]


def test_memory_share_verdict_and_labels(memory):
    assert "% saved, outputs identical" in memory["verdicts"][0]
    assert memory["allocated_shape"]["name"] == "small"  # CPU: honest about what was allocated
    assert memory["reported_shape"]["bytes_per_block"] == 16 * 8 * 64 * 8 * 2 * 2  # llama-1b, block 8, fp16


# -- throughput --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["w1", "longtail"])
def batching(request, tmp_path_factory):
    args = ["--workload", request.param, "--num-prompts", "24", "--scale", "0.06", "--block-size", "8",
            "--max-num-seqs", "64"]
    return run_json(throughput.main, args, tmp_path_factory.mktemp("throughput"))


def test_continuous_needs_fewer_steps_and_uses_kv_better(batching):
    static, cont = batching["modes"]["static"], batching["modes"]["continuous"]
    assert cont["num_steps"] < static["num_steps"]
    assert cont["kv_utilization_mean"] > static["kv_utilization_mean"]
    assert cont["max_concurrent"] >= static["max_concurrent"]
    assert batching["outputs"]["identical"]
    assert "outputs identical" in batching["verdict"]


def test_throughput_timeline_is_one_entry_per_step(batching):
    for mode, t in batching["timeline"].items():
        n = batching["modes"][mode]["num_steps"]
        assert len(t["slots_used"]) == len(t["slots_reserved"]) == len(t["num_running"]) == n
        assert all(u <= r <= batching["pool_token_slots"] for u, r in zip(t["slots_used"], t["slots_reserved"]))


def test_workloads_are_seeded_and_shaped():
    w1 = throughput.make_workload("w1", 128, seed=0)
    assert w1 == throughput.make_workload("w1", 128, seed=0)
    lens = [len(p) for p in w1.prompts]
    assert 64 <= min(lens) and max(lens) <= 512 and 64 <= min(w1.max_tokens) and max(w1.max_tokens) <= 512
    tail = throughput.make_workload("longtail", 200, seed=0).max_tokens
    long = [m for m in tail if m >= 768]
    assert 0 < len(long) < 0.25 * len(tail) and all(16 <= m <= 64 for m in tail if m < 768)


# -- plots ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional")
def test_plots_write_pngs(memory, batching, tmp_path):
    kernel = {"rows": [{"case": "bs16 ctx1024", "gbps": 1800.0}, {"case": "bs16 ctx4096", "gbps": 2400.0}],
              "read_ceiling_gbs": 3000.0}
    for draw, payload in ((plots.memory_share, memory), (plots.throughput, batching),
                          (plots.kernel_bandwidth, kernel)):
        path = draw(payload, tmp_path / f"{draw.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_series_read_kernel_bench_json():
    payload = {"read_GBps": 3084.6, "cases": [
        {"batch": 8, "context": 4096, "num_qo_heads": 32, "num_kv_heads": 8, "target_pct": 70, "v1_GBps": 130.0,
         "v2_GBps": 2330.0, "sdpa_GBps": float("nan"), "v2_default_us": 25.0}]}
    assert plots.kernel_series(payload) == [("8 x 4096, 32/8 heads", {"v1": 130.0, "v2": 2330.0}, 70)]
    assert plots._first_number(payload, plots.CEILING_KEYS) == 3084.6


def test_kernel_rows_tolerate_key_names():
    payload = {"device": {"peak_read_gbs": 3000}, "results": [
        {"batch": 8, "context_len": 1024, "version": 2, "bandwidth_gbs": 1500.5}, {"note": "no bandwidth"}]}
    assert plots.kernel_rows(payload) == [("batch=8 context_len=1024 version=2", 1500.5)]
    assert plots._first_number(payload, plots.CEILING_KEYS) == 3000.0


# -- optional parts missing: one line on stderr, exit code 2, no traceback (more in test_cli.py) -----------
def run_cli(module, *args, code=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", f"experiments.{module}", *args]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_plot_without_matplotlib_is_one_line_error():
    code = ("import sys; sys.modules['matplotlib'] = None; from experiments import memory_share; "
            "sys.exit(memory_share.main(sys.argv[1:]))")
    proc = run_cli(None, "--device", "cpu", "--plot", "x.png", code=code)
    assert proc.returncode == 2
    assert proc.stderr == "error: --plot needs matplotlib, which is not installed (pip install matplotlib)\n"


def test_kernel_bench_without_a_gpu_is_one_line_error():
    from pagedkv.backend import gpu_status

    if gpu_status()[0]:
        pytest.skip("a GPU is usable here: kernel_bench would run")
    proc = run_cli("kernel_bench")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: kernel_bench measures a GPU and none is usable")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


# -- fp8_accuracy's measures and train_checkpoint's helpers (no torch needed) --------------------------------

def _log_softmax(x):
    import numpy as np

    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_fp8_accuracy_compare_measures_kl_entropy_and_agreement():
    import numpy as np

    from experiments.fp8_accuracy import compare

    rng = np.random.default_rng(0)
    flat, peaked = np.zeros((3, 8)), rng.standard_normal((3, 8)) * 50
    same = compare([[1, 2, 3]], [[1, 2, 3]], [_log_softmax(flat)], [_log_softmax(flat)])
    assert same["mean_kl"] == 0 and same["token_agreement"] == 1 and same["mean_common_prefix"] == 3
    assert abs(same["mean_entropy_nats"] - np.log(8)) < 1e-12  # uniform over 8 tokens
    assert compare([[1]], [[1]], [_log_softmax(peaked)], [_log_softmax(peaked)])["mean_entropy_nats"] < 0.1
    ref = _log_softmax(flat + np.eye(8)[[7, 7, 7]])  # every position leans to token 7 ...
    moved = _log_softmax(flat + np.eye(3, 8))  # ... and, moved, to tokens 0, 1, 2
    got = compare([[1, 2, 3]], [[1, 5, 3]], [ref], [moved])
    assert got["mean_kl"] > 0 and got["top1_agreement_teacher_forced"] == 0
    assert got["token_agreement"] == 2 / 3 and got["mean_common_prefix"] == 1 and got["sequences_identical"] == 0


def test_train_checkpoint_reads_text_and_schedules_the_rate(tmp_path):
    from experiments.train_checkpoint import lr_at, read_text

    for name, text in (("a.py", "x = 1\n"), ("tests/b.py", "skipped\n"), ("c.py", "y = 2\n" * 100)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert read_text(tmp_path, 1 << 20) == ["x = 1\n", "y = 2\n" * 100]
    assert read_text(tmp_path, 1) == ["x = 1\n"]  # stops once max_bytes is reached
    with pytest.raises(SystemExit, match="no readable"):
        read_text(tmp_path / "tests" / "none", 10)
    rates = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert rates[9] == 1.0 and max(rates) == 1.0 and abs(rates[-1] - 0.1) < 0.01
    assert all(a <= b for a, b in zip(rates[:10], rates[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # then decays


def test_fp8_accuracy_scratch_cache_holds_the_largest_group():
    """Teacher forcing runs KL_GROUP sequences per prefill through one scratch cache: it must hold the largest
    group, not the first (a later, longer group ran past its slots)."""
    from experiments.fp8_accuracy import KL_GROUP, scratch_cache, teacher_forced_logprobs
    from pagedkv.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", block_size=16, max_model_len=512))
    seqs = [[1] * 10] * KL_GROUP + [[2] * 200] * KL_GROUP  # the second group needs 13x the first's blocks
    out = teacher_forced_logprobs(engine, scratch_cache(engine, seqs, "auto", engine.kv_cache), seqs,
                                  [5] * len(seqs), 4)
    assert len(out) == len(seqs) and all(x.shape == (4, engine.model_config.vocab_size) for x in out)
