"""python -m pagedkv.serve: --help, flag validation, and a model without a tokenizer refused before serving."""
import subprocess
import sys
from pathlib import Path

import pytest

from pagedkv.serve.cli import build_parser, engine_options, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_vllm_named_flags():
    run = subprocess.run([sys.executable, "-m", "pagedkv.serve", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for flag in ("--model", "--tokenizer", "--max-model-len", "--served-model-name", "--enforce-eager", "--port"):
        assert flag in run.stdout


@pytest.mark.parametrize("argv", [["--model", "x", "--port", "0"], ["--model", "x", "--port", "70000"],
                                  ["--model", "x", "--dtype", "int8"], ["--model", "x", "--block-size", "12"],
                                  ["--model", "x", "--max-model-len", "-5"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_engine_options_pass_only_the_flags_given():
    args = build_parser().parse_args(["--model", "tiny", "--max-model-len", "512", "--num-gpu-blocks-override", "64",
                                      "--enforce-eager", "--device", "cpu"])
    assert engine_options(args) == {"max_model_len": 512, "num_blocks": 64, "device": "cpu", "cuda_graph": False,
                                    "dtype": "float32"}  # a preset on a CPU: float32 random weights


def test_a_checkpoint_keeps_its_own_dtype(tmp_path):
    args = build_parser().parse_args(["--model", str(tmp_path), "--device", "cpu"])
    assert "dtype" not in engine_options(args)
    args = build_parser().parse_args(["--model", str(tmp_path), "--device", "cpu", "--dtype", "bfloat16"])
    assert engine_options(args)["dtype"] == "bfloat16"


def test_a_model_without_tokenizer_is_refused_before_serving(capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    assert main(["--model", "tiny", "--device", "cpu", "--num-gpu-blocks-override", "16"]) == 2
    assert "has no tokenizer: pass --tokenizer DIR" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["m", "--gpu-memory-utilization", "1.5"], ["m", "--kv-cache-dtype", "int4"],
                                  ["m", "--dtype", "float8"], ["m", "--max-request-body-bytes", "0"],
                                  ["m", "--chat-template-timeout", "-1"], ["m", "--num-gpu-blocks-override", "4",
                                                                          "--kv-cache-memory-bytes", "4096"]])
def test_bad_vllm_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_vllm_flags_map_onto_the_engine():
    from dataclasses import fields

    from pagedkv.engine import EngineConfig

    known = {f.name for f in fields(EngineConfig)}
    args = build_parser().parse_args(["tiny", "--device", "cpu", "--no-enable-prefix-caching", "--dtype", "auto",
                                      "--seed", "3"])
    options = engine_options(args)
    assert options["enable_prefix_caching"] is False and options["seed"] == 3 and options["dtype"] == "float32"
    args = build_parser().parse_args(["tiny", "--device", "cpu", "--kv-cache-dtype", "fp8"])
    if "kv_cache_dtype" in known:
        assert engine_options(args)["kv_cache_dtype"] == "fp8"
    else:
        with pytest.raises(ValueError, match="--kv-cache-dtype"):
            engine_options(args)
    args = build_parser().parse_args(["--model", "a", "b"])
    with pytest.raises(ValueError, match="disagree"):
        engine_options(args)


def test_readme_serve_commands_parse_as_written():
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    lines = [line.split("#")[0] for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
             for line in block.replace("\\\n", " ").splitlines() if line.startswith("pagedkv serve ")]
    assert lines
    for line in lines:
        build_parser().parse_args(shlex.split(line.replace("$KEY", "k"))[2:])


def test_tensor_parallel_size_reaches_the_engine_without_graphs():
    """Issue 22: --tensor-parallel-size in pagedkv serve (ranks as threads here: CUDA graphs off)."""
    args = build_parser().parse_args(["tiny", "--tensor-parallel-size", "2", "--device", "cpu"])
    options = engine_options(args)
    assert options["tensor_parallel_size"] == 2 and options["cuda_graph"] is False
