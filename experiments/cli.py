"""Shared command-line plumbing of the experiments: one line on stderr and a non-zero exit for every mistake.

Every experiment reports a user mistake the same way, before any work starts, without a traceback::

    $ python -m experiments.memory_share --block-size 12
    error: argument --block-size: invalid choice: 12 (choose from 8, 16, 32)
    $ python -m experiments.throughput --kv-cache-memory-bytes 1TiB --device cpu
    error: this run needs about 1.0 TiB of host memory (KV pool 1.0 TiB, ...), but about 21.3 GiB is available

What a new experiment uses (``from . import cli``; relative imports, so that it runs both as
``python -m experiments.NAME`` in a checkout and as ``python -m pagedkv.experiments.NAME`` once installed):

    Parser(description=...)             argparse whose parse errors are one ``error:`` line and exit code 2,
                                        named as the user called it (prog_name); give ``choices=`` so that help
                                        and validation cannot drift
    add_engine_flags(parser)            --kv-cache-memory-bytes | --num-gpu-blocks-override |
                                        --gpu-memory-utilization, --enforce-eager, --tensor-parallel-size,
                                        --kv-cache-dtype (vLLM's);
    check_engine_flags(args), engine_options(args, gpu=)   ranges; EngineConfig keyword arguments
    require_module(module, extra)       FlagError naming the pip install that brings a missing optional module
    @guarded main(argv)                 a FlagError raised anywhere in ``main`` becomes one line and exit 2
    FlagError(msg)                      a user mistake found after parsing (a range, a combination, memory)
    fail(msg, code=2)                   print ``error: msg`` and exit now
    in_range(flag, value, lo, hi)       value or FlagError naming the flag and the range
    add_common(parser, auto_dtype=, plot=)  --device, --dtype (auto), --seed, --output-json, [--plot]
    check_common(args)                  seed range; output paths writable (check_output_path)
    check_output_path(path, flag)       FlagError unless ``path`` can be written (checked before the run)
    resolve_backend(device)             the Backend, or a FlagError when --device gpu finds no GPU
    require_memory(host=, device=, parts=, backend=)
                                        FlagError when a run would allocate more than is available
    engine_bytes(model, dtype, ...)     weights + KV pool + activations of an LLMEngine run (for require_memory)
    available_memory(backend)           (host bytes, device bytes or None) available now
    write_json(path, payload)           write results (only where the user asked: --output-json)
    run_info(backend), console(), fmt_bytes(n)

Results are written only where the user says (``--output-json PATH``, ``--plot PATH``); with neither, a run
prints its table and writes nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

DEVICES = ("auto", "cpu", "gpu")
DTYPES = ("float16", "bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# NOTE: how the running tool calls itself in usage lines and in the JSON's "command"; set by the ``pagedkv``
# console script (``pagedkv bench kernels``), else ``python -m`` + the module's real name
PROG_ENV = "PAGEDKV_PROG"


class FlagError(ValueError):
    """A command-line mistake found after parsing; the message is the whole error line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a parse error (unknown flag, ``abc`` for an int, a bad choice) is one line and exit code 2,
    and the program name is the one the user typed (:func:`prog_name`), unless ``prog=`` is given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prog", prog_name())
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(message)


def prog_name() -> str:
    """``pagedkv bench NAME`` under the console script, else ``python -m <the running module's real name>``
    (``pagedkv.experiments.kernel_bench`` once installed, ``experiments.kernel_bench`` in a checkout)."""
    return os.environ.get(PROG_ENV) or "python -m " + _module_name()


def fail(message: str, code: int = 2):
    """Print ``error: message`` on stderr and exit with ``code`` (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def guarded(main):
    """Run ``main(argv)``; a :class:`FlagError` becomes one ``error:`` line and exit code 2."""
    def wrapper(argv=None):
        try:
            return main(argv)
        except FlagError as exc:
            fail(str(exc))
    wrapper.__doc__ = main.__doc__
    return wrapper


def in_range(flag: str, value, lo, hi, why: str = ""):
    """``value`` if ``lo <= value <= hi``, else :class:`FlagError` naming the flag and the range."""
    if not lo <= value <= hi:
        raise FlagError(f"{flag} must be in [{lo}, {hi}]{why}, got {value}")
    return value


def in_choices(flag: str, value, choices):
    """``value`` if in ``choices``, else :class:`FlagError` (prefer argparse ``choices=`` where the flag is parsed)."""
    if value not in choices:
        raise FlagError(f"{flag} must be in [{', '.join(str(c) for c in choices)}], got {value}")
    return value


# -- engine flags (one spelling per concept, vLLM's) -----------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512MiB"``, ``"40GiB"``, ``"1.5G"`` -> bytes (an argparse ``type=``)."""
    raw = str(text).strip().lower().replace("_", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):].strip()
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 536870912, 512MiB, 40GiB)") from None
    if not 1 <= value <= 2**50:
        raise argparse.ArgumentTypeError(f"size out of range [1 B, 1 PiB]: {text!r}")
    return int(value)


def add_engine_flags(parser: argparse.ArgumentParser, *, pool: bool = True, pool_default: str = "the engine's") -> None:
    """The engine flags that tools share, spelled as vLLM spells them: the KV pool size (bytes, blocks or a
    fraction of the GPU), ``--enforce-eager`` (no CUDA graphs) and ``--kv-cache-dtype``. Read back with
    :func:`engine_options`."""
    group = parser.add_argument_group("engine (vLLM's flag names)")
    if pool:
        size = group.add_mutually_exclusive_group()
        size.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None, metavar="BYTES",
                          help=f"KV pool size, e.g. 536870912, 512MiB, 40GiB (default: {pool_default})")
        size.add_argument("--num-gpu-blocks-override", type=int, default=None, metavar="N",
                          help="KV pool size in blocks (instead of bytes)")
        size.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                          help="share of the GPU's memory for weights, activations and the KV pool (GPU only)")
    group.add_argument("--enforce-eager", action="store_true", help="eager launches, no CUDA graphs")
    group.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                       help="split the model over N ranks (threads of this process in this build; no CUDA graphs)")
    group.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="KV cache element type (default auto: the model's dtype)")


def check_engine_flags(args) -> None:
    """Ranges of the shared engine flags (before any work)."""
    if getattr(args, "num_gpu_blocks_override", None) is not None:
        in_range("--num-gpu-blocks-override", args.num_gpu_blocks_override, 1, 10**8)
    if getattr(args, "gpu_memory_utilization", None) is not None:
        in_range("--gpu-memory-utilization", args.gpu_memory_utilization, 0.01, 1.0)
    in_range("--tensor-parallel-size", args.tensor_parallel_size, 1, 64)


def engine_options(args, *, gpu: bool) -> dict:
    """``EngineConfig`` keyword arguments of the shared engine flags (only those the user set)."""
    options = {"cuda_graph": gpu and not args.enforce_eager and args.tensor_parallel_size == 1}
    if args.tensor_parallel_size > 1:
        options["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "kv_cache_memory_bytes", None) is not None:
        options["kv_memory_bytes"] = args.kv_cache_memory_bytes
    if getattr(args, "num_gpu_blocks_override", None) is not None:
        options["num_blocks"] = args.num_gpu_blocks_override
    if getattr(args, "gpu_memory_utilization", None) is not None:
        if not gpu:
            raise FlagError("--gpu-memory-utilization needs a GPU; size the pool with --kv-cache-memory-bytes")
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.kv_cache_dtype != "auto":
        options["kv_cache_dtype"] = args.kv_cache_dtype
    return options


def require_module(module: str, extra: str) -> None:
    """:class:`FlagError` naming the ``pip install`` that brings ``module`` when it is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise FlagError(f"this needs the '{module}' package: pip install 'pagedkv[{extra}]'")


# -- common flags ----------------------------------------------------------------------------------------------
def add_common(parser: argparse.ArgumentParser, *, auto_dtype: str | None = None, plot: bool = True) -> None:
    """The flags experiments share: device, dtype, seed, the JSON output (vLLM's ``--output-json``) and a PNG.

    ``--dtype auto`` (the default) becomes ``auto_dtype`` in :func:`check_common`; None leaves "auto" for the
    experiment to resolve by device (float16 on a GPU, float32 on the CPU, as the engine experiments do)."""
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where to run (default auto: a GPU if usable)")
    parser.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES,
                        help=f"K/V and weights dtype (default auto: {auto_dtype or 'by device'})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--output-json", dest="json", default=None, metavar="PATH",
                        help="write the results as JSON here (default: nothing is written)")
    parser.set_defaults(auto_dtype=auto_dtype)
    if plot:
        parser.add_argument("--plot", default=None, metavar="PATH", help="also draw a PNG here (needs matplotlib)")


def check_common(args) -> None:
    """The seed's range and the writability of ``--output-json`` / ``--plot``, before any work."""
    if args.dtype == "auto" and args.auto_dtype is not None:
        args.dtype = args.auto_dtype
    in_range("--seed", args.seed, 0, 2**32 - 1)
    check_output_path(args.json, "--output-json")
    check_output_path(getattr(args, "plot", None), "--plot")


def check_output_path(path, flag: str) -> Path | None:
    """``path`` as a Path when a file can be written there, else :class:`FlagError`; None stays None.

    An existing file must open for appending (nothing is truncated); otherwise a probe file is created and
    removed in the nearest existing folder (NOTE: a probe, not ``os.access``, which says yes to root on a
    read-only or virtual file system such as /proc). Missing folders between are made when results are written.
    """
    if path is None:
        return None
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise FlagError(f"{flag} {str(path)!r} is a folder; give a file path")
    try:
        if p.exists():
            with open(p, "a"):
                return p
        parent = p.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise FlagError(f"{flag} {path}: {parent} is a file, not a folder")
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FlagError(f"{flag} {path} is not writable ({exc.strerror or exc})") from None
    return p


def require_gpu(what: str) -> None:
    """A one-line :class:`FlagError` (exit code 2, no traceback) unless a GPU is usable; ``what`` names who needs
    it, e.g. ``"kernel_bench measures a GPU"``."""
    from pagedkv.backend import gpu_status

    usable, reason = gpu_status()
    if not usable:
        raise FlagError(f"{what} and none is usable: {reason}")


def resolve_backend(device: str):
    """The :class:`pagedkv.Backend` for ``--device``; a requested but unusable GPU is a :class:`FlagError`."""
    from pagedkv.backend import get_backend, gpu_status

    try:
        return get_backend(device)
    except RuntimeError:
        raise FlagError(f"--device gpu needs a usable GPU: {gpu_status()[1]}") from None


# -- memory ----------------------------------------------------------------------------------------------------
def _host_available() -> int | None:
    """MemAvailable, bounded by the cgroup's limit (a container's), or None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return max(0, min(found)) if found else None


def available_memory(backend=None) -> tuple[int | None, int | None]:
    """``(host bytes, device bytes)`` available now; device is None without a GPU backend."""
    device = None
    if backend is not None and backend.is_gpu:
        xp = backend.xp
        device = int(xp.cuda.Device().mem_info[0]) + int(xp.get_default_memory_pool().free_bytes())
    return _host_available(), device


def require_memory(*, host: int = 0, device: int = 0, parts: dict | None = None, backend=None) -> None:
    """:class:`FlagError` naming the sizes when ``host`` (or, on a GPU backend, ``device``) bytes exceed what is
    available. ``parts`` (name -> bytes) explains the estimate in the message."""
    free_host, free_device = available_memory(backend)
    detail = f" ({', '.join(f'{k} {fmt_bytes(v)}' for k, v in parts.items())})" if parts else ""
    for need, free, where in ((host, free_host, "host"), (device, free_device, "GPU")):
        if free is not None and need > free:
            raise FlagError(f"this run needs about {fmt_bytes(need)} of {where} memory{detail}, but about "
                            f"{fmt_bytes(free)} is available; choose smaller sizes")


def engine_bytes(model, dtype: str, *, kv_bytes: int, max_num_batched_tokens: int, max_len: int,
                 max_num_seqs: int) -> dict:
    """What an LLMEngine run allocates, by part: weights, the KV pool, and one step's activations: float32 work
    buffers of the largest prefill chunk, the attention scores of its longest sequence (``max_len``: the
    longest prompt + output of the run), the decode batch's logits. ``model`` is a ``ModelConfig``."""
    from pagedkv.backend import dtype_of

    item = dtype_of(dtype).itemsize
    tokens = max_num_batched_tokens
    widths = 4 * model.hidden_size + model.qkv_size + 3 * model.intermediate_size
    act = tokens * widths * 4 + model.num_heads * min(tokens, max_len) * max_len * 4
    act += max_num_seqs * model.vocab_size * 4 * 2
    return {"weights": model.num_params() * item, "KV pool": int(kv_bytes), "activations": int(act)}


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# -- output ----------------------------------------------------------------------------------------------------
def gpu_name() -> str:
    """The current CUDA device's name, e.g. "NVIDIA H100 80GB HBM3"."""
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def device_name(backend) -> str:
    """A human name of the device: the GPU's name, or the host CPU's."""
    if backend.is_gpu:
        return gpu_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_info(backend) -> dict:
    """Where and when a run happened, and the command that made it (for the JSON)."""
    return {
        "device": device_name(backend),
        "backend": backend.name,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([prog_name()] + sys.argv[1:]),
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
    """The path experiments once wrote to by default; kept for callers that name it explicitly."""
    return f"benchmarks/results/{experiment}_{backend.name}.json"


def console():
    """A rich console for tables: the terminal's width, or 140 columns when piped (quotable logs)."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=140)
