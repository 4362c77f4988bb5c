"""serve_bench: --help on a CPU, one-line flag errors before any work, and small runs (in-process and over HTTP)
whose counts are exact (throughput and latency figures are only checked for being measured)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("experiments") is None:
    sys.path.insert(0, str(ROOT))

from experiments import serve_bench  # noqa: E402

SMALL = ["--num-prompts", "6", "--random-input-len", "12", "--random-output-len", "5", "--random-range-ratio", "0.5"]


def test_help_runs_without_a_gpu():
    run = subprocess.run([sys.executable, "-m", "experiments.serve_bench", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0 and "--request-rate" in run.stdout and "--output-json" in run.stdout


@pytest.mark.parametrize("argv, message", [
    (["--base-url", "localhost:8000"], "--base-url must start with http"),
    (["--base-url", "http://x", "--device", "cpu"], "--device is for in-process runs"),
    (["--base-url", "http://x", "--enforce-eager"], "--enforce-eager is for in-process runs"),
    (["--request-rate", "fast"], "--request-rate values must be numbers"),
    (["--request-rate", "-1"], "--request-rate values must be > 0"),
    (["--device", "cpu", "--num-prompts", "0"], "--num-prompts must be in"),
    (["--device", "cpu", "--random-range-ratio", "1.5"], "--random-range-ratio must be in"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--device", "cpu", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        serve_bench.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_poisson_arrivals_have_the_requested_rate():
    times = serve_bench.arrival_times(50.0, 4000, seed=1)
    assert times[0] == 0 and all(b >= a for a, b in zip(times, times[1:]))
    assert 4000 / times[-1] == pytest.approx(50.0, rel=0.05)
    assert serve_bench.arrival_times(float("inf"), 3, 0) == [0.0, 0.0, 0.0]


def check_rows(payload, rates, exact_times=True):
    """Counts are exact; in-process times are the engine's own stamps (every token has an ITL after the first),
    over HTTP a burst of tokens may arrive as one chunk (one ITL sample)."""
    rows = payload["results"]
    assert [r["request_rate"] for r in rows] == rates
    for r in rows:
        assert r["completed"] == 6 and r["failed"] == 0
        assert 6 * 2 <= r["total_output_tokens"] <= 6 * 7  # every request got exactly its own output length
        assert r["ttft_ms"]["p50"] > 0 and r["e2el_ms"]["p50"] >= r["ttft_ms"]["p50"]
        if exact_times:
            assert r["itl_ms"]["p99"] >= r["itl_ms"]["p50"] > 0
        assert r["output_throughput"] > 0


def test_in_process_run(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--model", "tiny", "--device", "cpu", "--request-rate", "100", "inf", "--output-json", str(out), *SMALL]
    assert serve_bench.main(argv) == 0
    payload = json.loads(out.read_text())
    check_rows(payload, [100.0, "inf"])
    assert payload["config"]["random_output_len"] == 5 and payload["target"] == "tiny"


def test_bare_cpu_run_is_small():
    args = serve_bench.parse_args(["--device", "cpu"])
    assert (args.model, args.num_prompts, args.random_input_len, args.random_output_len) == ("tiny", 16, 32, 16)
    args = serve_bench.parse_args(["--base-url", "http://127.0.0.1:1"])
    assert (args.model, args.num_prompts, args.random_input_len, args.random_output_len) == (None, 200, 256, 128)


def test_http_run_against_a_live_server(tmp_path):
    for name in ("fastapi", "uvicorn", "httpx", "tokenizers", "jinja2"):
        pytest.importorskip(name)
    from test_text_support import LiveServer, write_checkpoint

    from pagedkv.llm import LLM
    from pagedkv.serve.app import create_app
    from pagedkv.serve.cli import build_state

    checkpoint = write_checkpoint(tmp_path / "ckpt")
    live = LiveServer(create_app(build_state(LLM(str(checkpoint), device="cpu", num_blocks=64), "bench-model")))
    try:
        out = tmp_path / "bench.json"
        assert serve_bench.main(["--base-url", live.base, "--request-rate", "inf", "--output-json", str(out),
                                 *SMALL]) == 0
        payload = json.loads(out.read_text())
        check_rows(payload, ["inf"], exact_times=False)
        assert "bench-model" in payload["target"]
    finally:
        live.stop()
