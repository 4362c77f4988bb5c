"""The experiments' command lines (issue 8, findings 6 and 7): every module's ``--help`` and bare invocation work
on a CPU in seconds; a user mistake (a flag, a size the machine cannot hold, an unwritable output) exits
non-zero with one line and no traceback, before any work; no flag is silently ignored; nothing is written
unless asked."""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("experiments") is None:  # plain `pytest` (not `python -m pytest`) from elsewhere
    sys.path.insert(0, str(ROOT))

from experiments import BENCHMARKS, cli, engine_bench, memory_share, plots, profile_engine, throughput  # noqa: E402

MODULES = sorted(module for module, _ in BENCHMARKS.values())
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_module(module, *args, cwd=ROOT, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def refused(main, argv, capsys, *fragments):
    """``main(argv)`` exits 2 with one ``error:`` line holding every fragment (in-process: fast)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# -- every module: --help and a bare run on the CPU -------------------------------------------------------------
@pytest.mark.parametrize("module", MODULES)
def test_help_works_for_every_experiment(module):
    proc = run_module(module, "--help", timeout=60)  # throughput's help crashed on a '%' in a help string
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and proc.stderr == ""


@pytest.mark.parametrize("module", MODULES)
def test_bare_invocation_works_on_a_cpu_and_writes_nothing(module, tmp_path):
    from pagedkv.backend import gpu_status

    if gpu_status()[0]:
        pytest.skip("a GPU is usable here: a bare run would be the full GPU run")
    results = tmp_path / "benchmarks" / "results"  # as in a checkout (two of its results: plots draws them)
    results.mkdir(parents=True)
    for name in ("memory_share_gpu.json", "throughput_w1_gpu.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, results / name)
    before = sorted(tmp_path.rglob("*"))
    proc = run_module(module, cwd=tmp_path, timeout=90)
    if proc.returncode == 2 and "GPU" in proc.stderr:
        one_line_error(proc)  # a GPU-only benchmark (kernel_bench): one line saying it needs a GPU
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    made = sorted(set(tmp_path.rglob("*")) - set(before))
    if module == "plots":  # bare plots draws ./benchmarks/results into ./plots
        assert made and all(p.parent == tmp_path / "plots" or p == tmp_path / "plots" for p in made), made
        assert all(p.read_bytes()[:4] == b"\x89PNG" for p in made if p.is_file())
    else:
        assert made == [], made  # no JSON unless --output-json
    if module == "engine_bench":  # it built llama-1b in float16 on NumPy and printed nothing for 10 minutes
        first = proc.stdout.splitlines()[0]
        assert first.startswith("engine_bench: 32 requests") and "tiny float32 on cpu" in first, first


# -- user mistakes: one line, non-zero, before any work ------------------------------------------------------------
@pytest.mark.parametrize("module, args, expected", [
    ("memory_share", ["--block-size", "12"], "error: argument --block-size: invalid choice: 12 (choose from 8, 16"),
    ("memory_share", ["--num-requests", "0"], "error: --num-requests must be in [1, 4096], got 0"),
    ("memory_share", ["--num-gpu-blocks-override", "4", "--prompt-len", "100", "--device", "cpu"],
     "error: --prompt-len must be in [1, 64]"),
    ("memory_share", ["--device", "tpu"], "error: argument --device: invalid choice: 'tpu'"),
    ("throughput", ["--workload", "w9"], "error: argument --workload: invalid choice: 'w9'"),
    ("throughput", ["--device", "cpu", "--kv-cache-memory-bytes", "4096"],
     "error: --kv-cache-memory-bytes must be at least "),
    ("throughput", ["--kv-cache-memory-bytes", "12 apples"], "error: argument --kv-cache-memory-bytes: not a size"),
    ("throughput", ["--num-prompts", "abc"], "error: argument --num-prompts: invalid int value"),
    ("throughput", ["--kv-cache-memory-bytes", "1GiB", "--num-gpu-blocks-override", "8"],
     "error: argument --num-gpu-blocks-override: not allowed with"),
    ("engine_bench", ["--max-model-len", "0"], "error: --max-model-len must be in [8, "),
    ("engine_bench", ["--enforce-eager", "--compare-eager"], "error: --compare-eager needs a GPU and CUDA graphs"),
    ("prefix_workloads", ["--num-prompts", "100000", "--shared-len", "100000000"],
     "error: --num-prompts must be in [1, 4096], got 100000"),
    ("prefix_workloads", ["--device", "cpu", "--shared-len", "100000000"], "error: --shared-len must be in [1, "),
    ("engine_bench", ["--num-prompts", "0"], "error: --num-prompts must be in [1, 4096], got 0"),
    ("engine_bench", ["--model", "llama-9b"], "error: argument --model: invalid choice: 'llama-9b'"),
    ("profile_engine", ["--mode", "fast"], "error: argument --mode: invalid choice: 'fast'"),
    ("plots", ["--kernel-json", "/nonexistent.json", "--out", "x.png"], "error: --kernel-json must be"),
])
def test_bad_flag_is_one_line_and_exit_code_2(module, args, expected, capsys):
    main = importlib.import_module(f"experiments.{module}").main
    err = refused(main, args, capsys)
    assert err.startswith(expected), err


def test_bad_flag_from_the_shell_has_no_traceback():
    one_line_error(run_module("engine_bench", "--max-model-len", "0"))  # it printed a traceback and exited 0


def test_engine_bench_small_request_counts_run(tmp_path):
    # --num-requests 2 raised "2 prompts but 4 SamplingParams" (a traceback, exit 0); --max-len 8 is the smallest
    out = tmp_path / "eb.json"
    assert engine_bench.main(["--device", "cpu", "--num-prompts", "2", "--max-model-len", "8",
                              "--output-json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["continuous"] and "error" not in runs["continuous"]
    assert runs["continuous"]["useful_tokens"] == json.loads(out.read_text())["workload"]["useful_tokens"]


@pytest.mark.parametrize("main, argv", [
    (memory_share.main, ["--device", "cpu"]), (throughput.main, ["--device", "cpu"]),
    (engine_bench.main, ["--device", "cpu"]), (profile_engine.main, ["--device", "cpu"]),
    (importlib.import_module("experiments.prefix_workloads").main, ["--device", "cpu"]),
])
@pytest.mark.parametrize("where", ["folder", "file-as-folder", "virtual"])
def test_unwritable_output_is_refused_before_the_run(main, argv, where, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    path = {"folder": str(tmp_path), "file-as-folder": str(tmp_path / "file" / "out.json"),
            "virtual": "/proc/pagedkv/out.json"}[where]
    monkeypatch.setattr(cli, "require_memory", lambda **k: pytest.fail("reached the run"))
    refused(main, argv + ["--output-json", path], capsys, "--output-json")


def test_plot_path_is_checked_before_the_run(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    refused(memory_share.main, ["--device", "cpu", "--plot", str(tmp_path / "file" / "x.png")], capsys, "--plot")


# -- memory: sizes the range checks accept are refused with the number, not a MemoryError -------------------------
@pytest.mark.parametrize("main, argv, part", [
    (throughput.main, ["--kv-cache-memory-bytes", str(2**40)], "KV pool 1.0 TiB"),  # 1 TiB passed the range check
    (throughput.main, ["--kv-cache-memory-bytes", "1000000MiB"], "KV pool 976.6 GiB"),
    (memory_share.main, ["--num-requests", "4096", "--prompt-len", "131072"], "KV pools"),  # 8 TiB on a GPU
    (memory_share.main, ["--alloc-shape", "llama-1b", "--num-requests", "1024", "--prompt-len", "4000"], "KV pools"),
    (engine_bench.main, ["--model", "llama-1b", "--num-prompts", "16", "--max-model-len", "64"], "weights"),
    (profile_engine.main, ["--kv-cache-memory-bytes", "100000MiB"], "KV pool"),
    # issue 21 finding 10: prefix_workloads allocated 48.8 TiB and died with a traceback
    (importlib.import_module("experiments.prefix_workloads").main,
     ["--model", "tiny", "--num-prompts", "4096", "--shared-len", "900", "--kv-cache-memory-bytes", "4TiB"],
     "KV pool 4.0 TiB"),
])
def test_runs_larger_than_memory_are_refused_with_the_number(main, argv, part, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_host_available", lambda: 2 << 30)  # a 2 GiB machine, whatever runs the tests
    err = refused(main, ["--device", "cpu"] + argv, capsys, "of host memory", "2.0 GiB is available", part)
    assert "this run needs about" in err


def test_a_terabyte_run_is_refused_from_the_shell():
    proc = run_module("throughput", "--device", "cpu", "--kv-cache-memory-bytes", "1TiB", timeout=30)
    assert "1.0 TiB" in one_line_error(proc)


def test_memory_estimate_admits_the_default_runs(monkeypatch):
    monkeypatch.setattr(cli, "_host_available", lambda: 1 << 30)  # 1 GiB is plenty for every CPU default
    cpu = cli.resolve_backend("cpu")
    throughput.resolve(throughput.parse_args(["--device", "cpu"]), cpu)
    assert memory_share.resolve(memory_share.parse_args(["--device", "cpu"]), cpu).name == "small"
    args = engine_bench.parse_args(["--device", "cpu"])
    engine_bench.check_memory(args, cpu, engine_bench.resolve(args, cpu), longest=args.max_len)


# -- no flag silently ignored ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("main, argv, fragment", [
    (engine_bench.main, ["--compare-eager"], "--compare-eager needs a GPU"),
    (throughput.main, ["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization"),
    (engine_bench.main, ["--plot", "x.png"], "unrecognized arguments: --plot"),
    (profile_engine.main, ["--plot", "x.png"], "unrecognized arguments: --plot"),
])
def test_flags_the_run_cannot_honour_are_refused(main, argv, fragment, capsys):
    refused(main, ["--device", "cpu"] + argv, capsys, fragment)


def test_profile_engine_honours_dtype_seed_and_json(tmp_path):
    def run(seed):
        out = tmp_path / f"p{seed}.json"
        argv = ["--device", "cpu", "--num-prompts", "4", "--dtype", "float32", "--seed", str(seed), "--top", "3"]
        assert profile_engine.main(argv + ["--output-json", str(out)]) == 0
        return json.loads(out.read_text())

    a, b = run(7), run(8)
    assert (a["config"]["dtype"], a["config"]["seed"]) == ("float32", 7)
    assert a["workload"]["num_requests"] == 4 and len(a["top_functions"]) == 3
    assert a["workload"] != b["workload"]  # the seed reaches the workload


def test_one_spelling_per_concept():
    """Issue 20: the KV pool size had six spellings across tools, CUDA graphs two: each concept has one now."""
    sources = "\n".join(p.read_text() for p in (ROOT / "experiments").glob("*.py"))
    sources += "\n".join(p.read_text() for p in (ROOT / "pagedkv").rglob("*.py"))
    for old in ("--kv-budget-mb", "--kv-budget-bytes", "--kv-memory-gb", "--num-blocks\"", "--cuda-graph\"",
                "\"--graph\"", "\"--json\"", "\"--max-len\"", "\"--num-requests\", dest=\"num_requests\""):
        assert old not in sources, old


def test_sizes_take_units():
    assert cli.parse_bytes("512MiB") == 512 << 20 and cli.parse_bytes("40GiB") == 40 << 30
    assert cli.parse_bytes("1073741824") == 1 << 30 and cli.parse_bytes("1.5G") == 1_500_000_000



# -- plots -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, payload", [
    ("--memory-json", {"scenarios": 3}), ("--throughput-json", {"timeline": {}}), ("--memory-json", [1, 2]),
    ("--kernel-json", {"cases": [{"batch": 1}]}),
])
def test_plots_on_a_wrong_structure_json_is_one_line(flag, payload, tmp_path, capsys):
    (tmp_path / "in.json").write_text(json.dumps(payload))
    refused(plots.main, [flag, str(tmp_path / "in.json"), "--out", str(tmp_path / "x.png")], capsys, flag)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional")
def test_plots_default_out_is_the_input_name_in_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "benchmarks" / "results" / "memory_share_gpu.json", tmp_path / "m.json")
    assert plots.main(["--memory-json", "m.json"]) == 0
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_bare_plots_without_results_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(plots.main, [], capsys, "nothing to draw", "--output-json")


def test_bench_subcommands_dispatch_to_the_experiments(monkeypatch, capsys):
    """``pagedkv bench NAME`` (here over the checkout's experiments package) runs NAME's module as that name."""
    import pagedkv.cli_main as cli_main

    monkeypatch.setattr(cli_main, "EXPERIMENTS", "experiments")
    monkeypatch.setattr(cli_main, "COMMANDS", {**cli_main.COMMANDS, **cli_main._bench_rows()})
    monkeypatch.delenv(cli.PROG_ENV, raising=False)
    assert {f"bench {n}" for n in BENCHMARKS} <= set(cli_main.COMMANDS)
    with pytest.raises(SystemExit) as info:
        cli_main.main(["bench", "throughput", "--help"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: pagedkv bench throughput")
    assert cli_main.main(["bench", "--help"]) == 0 and "bench prefix" in capsys.readouterr().out
    assert cli_main.main(["bench", "nosuch"]) == 2
    assert cli.PROG_ENV not in os.environ  # nothing started later inherits the bench name
