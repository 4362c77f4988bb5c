"""``pagedkv serve MODEL``: load a model, start the engine loop, serve the OpenAI API with uvicorn.

::

    pagedkv serve path/to/hf-checkpoint --port 8000 --api-key $KEY
    pagedkv serve llama-1b --tokenizer path/with/tokenizer.json --dtype float16
    python -m pagedkv.serve --model path/to/hf-checkpoint        # the same (MODEL as --model)

Flags are vLLM's where they mean the same thing. ``--host`` defaults to 127.0.0.1 (vLLM: 0.0.0.0): listening on
every interface is an explicit choice, best with ``--api-key``. The request limits (``--max-request-body-bytes``
...) are pagedkv's own (vLLM has none of them): see :mod:`pagedkv.serve.limits`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from ..text.extras import require
from .limits import ServerLimits

DTYPES = ("auto", "float16", "bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
DEVICES = ("auto", "cpu", "gpu")
BLOCK_SIZES = (8, 16, 32)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    return parse


_positive = _int_at_least(1)


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is in [1, 65535], got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {value}")
    return value


def build_parser(prog: str = "pagedkv serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json) or a preset "
                        "name (random weights: needs --tokenizer)")
    p.add_argument("--model", default=None, help="the same as MODEL (python -m pagedkv.serve --model DIR)")
    p.add_argument("--tokenizer", default=None, help="a folder with tokenizer.json (default: the model folder)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL)")
    p.add_argument("--chat-template", default=None,
                   help="a jinja2 chat template: a file, or the template text (default: the tokenizer's)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="default 8000")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 route (default: no auth)")
    engine = p.add_argument_group("engine (vLLM's flag names)")
    engine.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights and KV cache (auto: the checkpoint's; a preset: float16 on a GPU, else float32)")
    engine.add_argument("--device", choices=DEVICES, default="auto", help="default auto: a usable GPU, else the CPU")
    engine.add_argument("--max-model-len", type=_positive, default=None,
                        help="longest prompt + completion (default: the engine's)")
    engine.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None,
                        help="tokens per KV block (default: the engine's)")
    size = engine.add_mutually_exclusive_group()
    size.add_argument("--gpu-memory-utilization", type=_fraction, default=None,
                      help="share of the GPU's memory the engine may use (default: the engine's sizing)")
    size.add_argument("--num-gpu-blocks-override", type=_positive, default=None, help="KV blocks in the pool")
    size.add_argument("--kv-cache-memory-bytes", type=_positive, default=None, help="KV pool size in bytes")
    engine.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="KV cache element type (default auto: the model's dtype)")
    engine.add_argument("--max-num-seqs", type=_positive, default=None, help="sequences per step")
    engine.add_argument("--max-num-batched-tokens", type=_positive, default=None, help="tokens per step")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse the KV blocks of shared prompt prefixes (default: on)")
    engine.add_argument("--seed", type=_int_at_least(0), default=None, help="seed (a preset's random weights)")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument("--tensor-parallel-size", type=_positive, default=None,
                        help="split the model over N ranks (threads of this process in this build; no CUDA graphs)")
    limits = p.add_argument_group("request limits (pagedkv's; see pagedkv.serve.limits)")
    default = ServerLimits()
    limits.add_argument("--max-request-body-bytes", type=_positive, default=default.max_request_body_bytes,
                        help=f"larger bodies get a 413 (default {default.max_request_body_bytes})")
    limits.add_argument("--max-prompt-tokens", type=_positive, default=None,
                        help="longest prompt (default: max_model_len)")
    limits.add_argument("--max-choices-per-request", type=_positive, default=default.max_choices_per_request,
                        help=f"prompts x n per request (default {default.max_choices_per_request})")
    limits.add_argument("--max-stop-strings", type=_positive, default=default.max_stop_strings,
                        help=f"stop strings per request (default {default.max_stop_strings})")
    limits.add_argument("--max-stop-string-len", type=_positive, default=default.max_stop_string_len,
                        help=f"characters per stop string (default {default.max_stop_string_len})")
    limits.add_argument("--chat-template-timeout", type=_seconds, default=default.chat_template_timeout_s,
                        help=f"seconds a chat template may render (default {default.chat_template_timeout_s:g})")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info")
    return p


def server_limits(args) -> ServerLimits:
    return ServerLimits(max_request_body_bytes=args.max_request_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                        max_choices_per_request=args.max_choices_per_request, max_stop_strings=args.max_stop_strings,
                        max_stop_string_len=args.max_stop_string_len, chat_template_timeout_s=args.chat_template_timeout)


def model_of(args) -> str:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"MODEL {args.model_tag!r} and --model {args.model!r} disagree: give one")
    model = args.model_tag or args.model
    if not model:
        raise ValueError("give the model: pagedkv serve MODEL (a checkpoint folder or a preset)")
    return model


def engine_options(args) -> dict:
    """Keyword arguments of ``LLM``/``EngineConfig`` from the flags that were given (the rest keep the engine's
    defaults): vLLM's names where EngineConfig has them, else today's (``num_blocks``, ``cuda_graph``...).

    Raises:
        ValueError: a flag this build's engine cannot honour (``--kv-cache-dtype fp8`` without fp8 KV...).
    """
    from ..engine import EngineConfig

    known = {f.name for f in fields(EngineConfig)}
    flags = {"max_model_len": "max_model_len", "block_size": "block_size", "max_num_seqs": "max_num_seqs",
             "max_num_batched_tokens": "max_num_batched_tokens", "seed": "seed",
             "enable_prefix_caching": "enable_prefix_caching",
             "num_gpu_blocks_override": "num_blocks", "kv_cache_memory_bytes": "kv_memory_bytes",
             "gpu_memory_utilization": "gpu_memory_utilization", "kv_cache_dtype": "kv_cache_dtype",
             "tensor_parallel_size": "tensor_parallel_size"}
    options = {}
    for flag, field in flags.items():
        value = getattr(args, flag)
        if value is None or (flag == "kv_cache_dtype" and value == "auto"):
            continue
        name = flag if flag in known else field
        if name not in known:
            raise ValueError(f"--{flag.replace('_', '-')} is not supported by this build's engine")
        options[name] = value
    options["device"] = args.device
    if "enforce_eager" in known:
        options["enforce_eager"] = args.enforce_eager
    else:  # NOTE: tensor-parallel ranks run as threads of this process, without CUDA graphs
        options["cuda_graph"] = not args.enforce_eager and (args.tensor_parallel_size or 1) == 1
    if args.dtype != "auto":
        options["dtype"] = args.dtype
    elif not Path(model_of(args)).is_dir():  # NOTE: random weights would be float32
        from ..backend import get_backend

        options["dtype"] = "float16" if get_backend(args.device).is_gpu else "float32"
    return options


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's text, or the value itself when it holds jinja2 (``{``)."""
    if value is None:
        return None
    path = Path(value)
    if "{" not in value:
        if not path.is_file():
            raise ValueError(f"--chat-template {value!r} is neither a file nor jinja2 text")
        return path.read_text(encoding="utf-8")
    return value


def build_state(llm, served_model_name: str | None = None, root: str = "", **state_options):
    """The server's shared state around an :class:`~pagedkv.LLM` (its engine moves into an AsyncLLM)."""
    from ..engine.async_llm import AsyncLLM
    from .app import ServerState

    if llm.tokenizer is None:
        raise ValueError(f"model {llm.model_name!r} has no tokenizer: pass --tokenizer DIR (a folder with "
                         f"tokenizer.json)")
    return ServerState(loop=AsyncLLM(llm.engine), tokenizer=llm.tokenizer,
                       model_name=served_model_name or llm.model_name, max_model_len=llm.engine.max_model_len,
                       defaults=llm.default_sampling_params, root=root or llm.model_name,
                       vocab_size=llm.engine.model_config.vocab_size, **state_options)


def build_server(args):
    """``(app, state)`` from parsed flags: the model loaded, the engine loop not started (the app's lifespan
    starts it). Raises ValueError for a flag or model the engine refuses."""
    from ..llm import LLM
    from .app import create_app

    model = model_of(args)
    template = read_chat_template(args.chat_template)
    llm = LLM(model, tokenizer=args.tokenizer, **engine_options(args))
    state = build_state(llm, args.served_model_name, model, limits=server_limits(args), api_key=args.api_key,
                        chat_template=template)
    return create_app(state), state


def main(argv=None, prog: str = "pagedkv serve") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        modules = [require(name, "the server") for name in SERVE_MODULES]
    except ImportError as exc:  # NOTE: one line naming the pip install, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn = modules[1]
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        app, state = build_server(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"pagedkv: serving {state.model_name!r} (max_model_len {state.max_model_len}) on "
          f"http://{args.host}:{args.port}/v1{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
