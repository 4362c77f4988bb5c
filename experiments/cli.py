"""Shared command-line plumbing: flag checks that fail with ONE line on stderr and exit code 2.

Every experiment reports a bad flag the same way, without a traceback::

    $ python -m experiments.memory_share --block-size 12
    error: --block-size must be in [8, 16, 32], got 12
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

DEVICES = ("auto", "cpu", "gpu")
DTYPES = ("float16", "bfloat16", "float32")


class FlagError(ValueError):
    """A command-line flag outside its allowed range; the message is the whole error line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a parse error (unknown flag, ``abc`` for an int) is one line and exit code 2."""

    def error(self, message):
        fail(message)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def in_range(flag: str, value, lo, hi, why: str = ""):
    """``value`` if ``lo <= value <= hi``, else :class:`FlagError` naming the flag and the range."""
    if not lo <= value <= hi:
        raise FlagError(f"{flag} must be in [{lo}, {hi}]{why}, got {value}")
    return value


def in_choices(flag: str, value, choices):
    if value not in choices:
        raise FlagError(f"{flag} must be in [{', '.join(str(c) for c in choices)}], got {value}")
    return value


def add_common(parser: argparse.ArgumentParser, *, dtype: str = "float16") -> None:
    """The flags every experiment shares: device, dtype, seed, JSON and PNG outputs."""
    parser.add_argument("--device", default="auto", help="auto | cpu | gpu (default auto)")
    parser.add_argument("--dtype", default=dtype, help=f"float16 | bfloat16 | float32 (default {dtype})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the results (default benchmarks/results/<experiment>_<device>.json)")
    parser.add_argument("--plot", default=None, metavar="PATH", help="also write a PNG here (needs matplotlib)")


def check_common(args, dtypes=DTYPES) -> None:
    in_choices("--device", args.device, DEVICES)
    in_choices("--dtype", args.dtype, dtypes)
    in_range("--seed", args.seed, 0, 2**32 - 1)


def resolve_backend(device: str):
    """The :class:`pagedkv.Backend` for ``--device``; a requested but unusable GPU is a :class:`FlagError`."""
    from pagedkv.backend import get_backend, gpu_status

    try:
        return get_backend(device)
    except RuntimeError:
        raise FlagError(f"--device gpu needs a usable GPU: {gpu_status()[1]}") from None


def device_name(backend) -> str:
    """A human name of the device: the GPU's name, or the host CPU's."""
    if backend.is_gpu:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_info(backend) -> dict:
    """Where and when a run happened, and the command that made it (for the JSON)."""
    return {
        "device": device_name(backend),
        "backend": backend.name,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m " + " ".join([_module_name()] + sys.argv[1:]),
        "python": platform.python_version(),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def default_json(experiment: str, backend) -> str:
    return f"benchmarks/results/{experiment}_{backend.name}.json"


def guarded(main):
    """Run ``main(argv)``; a :class:`FlagError` becomes one ``error:`` line and exit code 2."""
    def wrapper(argv=None):
        try:
            return main(argv)
        except FlagError as exc:
            fail(str(exc))
    wrapper.__doc__ = main.__doc__
    return wrapper


def console():
    """A rich console for tables: the terminal's width, or 140 columns when piped (quotable logs)."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=140)
