"""``python -m pagedkv.serve``: load a model, start the engine loop, serve the OpenAI API with uvicorn.

::

    python -m pagedkv.serve --model path/to/hf-checkpoint --port 8000
    python -m pagedkv.serve --model llama-1b --tokenizer path/with/tokenizer.json --dtype float16

Flags reuse vLLM's names where they mean the same thing. ``--host`` defaults to 127.0.0.1 (vLLM: 0.0.0.0):
this server has no authentication, so listening on every interface is an explicit choice.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..text.extras import require

DTYPES = ("float16", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "gpu")
BLOCK_SIZES = (8, 16, 32)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is in [1, 65535], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pagedkv.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json) or a preset "
                        "name (random weights: needs --tokenizer)")
    p.add_argument("--tokenizer", default=None, help="a folder with tokenizer.json (default: the model folder)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="default 8000")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and KV cache (default: the checkpoint's; a preset: float16 on a GPU, else float32)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto: a usable GPU, else the CPU")
    p.add_argument("--max-model-len", type=_positive, default=None,
                   help="longest prompt + completion (default: the engine's)")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None,
                   help="tokens per KV block (default: the engine's)")
    p.add_argument("--num-gpu-blocks-override", type=_positive, default=None,
                   help="KV blocks in the pool (default: sized from free memory on a GPU)")
    p.add_argument("--kv-cache-memory-bytes", type=_positive, default=None, help="KV pool size in bytes")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"), default=None,
                   help="KV cache element type (default auto: the model's; fp8 = fp8_e4m3: half the bytes)")
    p.add_argument("--max-num-seqs", type=_positive, default=None, help="sequences per step")
    p.add_argument("--max-num-batched-tokens", type=_positive, default=None, help="tokens per step")
    p.add_argument("--seed", type=int, default=None, help="seed of a preset's random weights")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="uvicorn's (default info)")
    return p


def engine_options(args) -> dict:
    """EngineConfig fields from the flags that were given (the rest keep the engine's defaults)."""
    names = {"dtype": "dtype", "max_model_len": "max_model_len", "block_size": "block_size",
             "num_gpu_blocks_override": "num_blocks", "kv_cache_memory_bytes": "kv_memory_bytes",
             "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens", "seed": "seed",
             "kv_cache_dtype": "kv_cache_dtype"}
    options = {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag) is not None}
    options["device"] = args.device
    options["cuda_graph"] = not args.enforce_eager
    if args.dtype is None and not Path(args.model).is_dir():  # NOTE: random weights would be float32
        from ..backend import get_backend

        options["dtype"] = "float16" if get_backend(args.device).is_gpu else "float32"
    return options


def build_state(llm, served_model_name: str | None = None, root: str = ""):
    """The server's shared state around an :class:`~pagedkv.LLM` (its engine moves into an EngineLoop)."""
    from .app import ServerState
    from .engine_loop import EngineLoop

    if llm.tokenizer is None:
        raise ValueError(f"model {llm.model_name!r} has no tokenizer: pass --tokenizer DIR (a folder with "
                         f"tokenizer.json)")
    return ServerState(loop=EngineLoop(llm.engine), tokenizer=llm.tokenizer,
                       model_name=served_model_name or llm.model_name, max_model_len=llm.engine.max_model_len,
                       defaults=llm.default_sampling_params, root=root or llm.model_name,
                       vocab_size=llm.engine.model_config.vocab_size)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    uvicorn = require("uvicorn", "the server")
    require("fastapi", "the server")
    from ..llm import LLM
    from .app import create_app

    try:
        llm = LLM(args.model, tokenizer=args.tokenizer, **engine_options(args))
        state = build_state(llm, args.served_model_name, args.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"pagedkv: serving {state.model_name!r} (max_model_len {state.max_model_len}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0
