"""The ``pagedkv`` console script: ``pagedkv SUBCOMMAND [ARGS]``, one table of subcommands.

::

    pagedkv serve MODEL [--port 8000 --api-key KEY ...]      the OpenAI-compatible server
    pagedkv bench NAME [ARGS]                                an experiment of pagedkv.experiments (bench --help)
    pagedkv --version

A subcommand is a row of :data:`COMMANDS`: the module whose ``main(argv, prog=...)`` runs it (imported only when
chosen, so a missing optional extra fails only its own subcommand), and a one-line summary for ``--help``.
Nested subcommands (``pagedkv bench throughput``) are rows whose name has a space.
"""
from __future__ import annotations

import importlib
import os
import sys

# name -> (module with main(argv, prog), summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pagedkv.serve.cli", "serve a model over the OpenAI API (vLLM's flags)"),
}
EXPERIMENTS = "pagedkv.experiments"  # ``bench`` rows: its BENCHMARKS table (experiments/ ships as this package)
PROG_ENV = "PAGEDKV_PROG"  # how an experiment names itself in usage lines (experiments/cli.py reads it)


def _bench_rows() -> dict[str, tuple[str, str]]:
    """``bench NAME`` rows from the experiments' table (none where the experiments are not installed)."""
    try:
        table = importlib.import_module(EXPERIMENTS).BENCHMARKS
    except ImportError:
        return {}
    return {f"bench {name}": (f"{EXPERIMENTS}.{module}", summary) for name, (module, summary) in table.items()}


COMMANDS.update(_bench_rows())


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in sorted(COMMANDS.items()))
    return f"usage: pagedkv COMMAND [ARGS]   (pagedkv COMMAND --help for its flags)\n\ncommands:\n{rows}\n"


def find(argv: list[str]) -> tuple[str | None, list[str]]:
    """The longest command name that ``argv`` starts with, and the arguments after it."""
    for take in (2, 1):
        name = " ".join(argv[:take])
        if len(argv) >= take and name in COMMANDS:
            return name, argv[take:]
    return None, argv


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"pagedkv {__version__}")
        return 0
    name, rest = find(argv)
    if name is None and argv[0] == "bench":
        asked = argv[1:2] in ([], ["-h"], ["--help"])
        rows = {n: row for n, row in COMMANDS.items() if n.startswith("bench ")}
        if not rows:
            print("error: pagedkv bench needs the experiments, which ship in the installed package", file=sys.stderr)
            return 2
        width = max(map(len, rows))
        listing = "\n".join(f"  {n:<{width}}  {summary}" for n, (_, summary) in sorted(rows.items()))
        text = f"usage: pagedkv bench NAME [ARGS]   (pagedkv bench NAME --help for its flags)\n\n{listing}\n"
        if asked:
            print(text, end="")
            return 0
        print(f"error: unknown benchmark {argv[1]!r}\n{text}", end="", file=sys.stderr)
        return 2
    if name is None:
        print(f"error: unknown command {argv[0]!r}\n{usage()}", end="", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if not name.startswith("bench "):
        return module.main(rest, prog=f"pagedkv {name}")
    before = os.environ.get(PROG_ENV)
    os.environ[PROG_ENV] = f"pagedkv {name}"
    try:
        result = module.main(rest)
    finally:  # NOTE: restored, so that nothing started later (a subprocess, another command) inherits the name
        if before is None:
            os.environ.pop(PROG_ENV, None)
        else:
            os.environ[PROG_ENV] = before
    return result if isinstance(result, int) else 0  # NOTE: some experiments return their results


if __name__ == "__main__":
    sys.exit(main())
