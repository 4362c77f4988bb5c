"""PNG figures from the experiments' JSON (matplotlib is optional: ``pip install matplotlib``).

    memory_share(payload, path)      naive vs shared KV memory as bars, and blocks in use over the run
    throughput(payload, path)        KV usage and running requests per model step, static vs continuous
    kernel_bandwidth(payload, path)  achieved bandwidth per kernel case against the device's read ceiling

    python -m experiments.plots        # every result in ./benchmarks/results -> ./plots/<name>.png
    python -m experiments.plots --kernel-json benchmarks/results/kernel_bench_gpu.json --out docs/kernel_bandwidth.png
    python -m experiments.plots --memory-json benchmarks/results/memory_share_gpu.json --out docs/memory_share.png
    python -m experiments.plots --throughput-json benchmarks/results/throughput_w1_gpu.json --out docs/throughput_w1.png
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from . import cli

GB = 1e9
COLORS = {"naive": "#c44e52", "shared": "#4c72b0", "static": "#c44e52", "continuous": "#4c72b0"}


def _pyplot(flag: str = "--plot"):
    """matplotlib's pyplot on the file-only Agg backend, or a one-line :class:`cli.FlagError` naming ``flag``."""
    try:
        import matplotlib
    except ImportError:
        raise cli.FlagError(f"{flag} needs matplotlib, which is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_available(flag: str = "--plot") -> None:
    """Fail early (one line, exit 2) when a PNG was asked for but matplotlib is missing."""
    _pyplot(flag)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    _pyplot().close(fig)
    return path


def _footer(fig, payload: dict) -> None:
    run = payload.get("run", {})
    fig.text(0.01, 0.005, f"{run.get('device', '?')}, {run.get('date_utc', '?')}: {run.get('command', '')}",
             fontsize=7, color="gray", ha="left", va="bottom")


# -- memory_share ----------------------------------------------------------------------------------------------
def memory_share(payload: dict, path) -> Path:
    """Left: GB in use at the end, naive vs shared, per scenario. Right: GB in use per step of the first one."""
    plt = _pyplot()
    fig, (bars, line) = plt.subplots(1, 2, figsize=(11, 4.2))
    scenarios, rep = payload["scenarios"], payload["reported_shape"]
    x = range(len(scenarios))
    for i, mode in enumerate(("naive", "shared")):
        values = [r[mode]["bytes_used"] / GB for r in scenarios]
        rects = bars.bar([j + (i - 0.5) * 0.38 for j in x], values, 0.38, label=mode, color=COLORS[mode])
        if mode == "shared":
            bars.bar_label(rects, [f"-{r['saved_pct']:.0f}%" for r in scenarios], fontsize=9)
    bars.set_xticks(list(x), [r["scenario"]["name"] for r in scenarios])
    bars.set_ylabel(f"KV memory in use (GB, {rep['name']} {rep['dtype']})")
    bars.set_title("KV memory at the end of the run")
    bars.legend()
    first = scenarios[0]
    for mode, used in first["timeline_used_blocks"].items():
        line.plot([b * rep["bytes_per_block"] / GB for b in used], label=mode, color=COLORS[mode])
    line.set_xlabel("operation (prefill, suffix, then one per generated token)")
    line.set_ylabel("GB in use")
    line.set_title(f"{first['scenario']['name']}: pool usage over the run")
    line.legend()
    _footer(fig, payload)
    return _save(fig, path)


# -- throughput ------------------------------------------------------------------------------------------------
def throughput(payload: dict, path) -> Path:
    """Top: filled and reserved token slots (% of the pool) per model step. Bottom: running requests per step."""
    plt = _pyplot()
    fig, (kv, run) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    pool = payload["pool_token_slots"]
    for mode, t in payload["timeline"].items():
        c = COLORS.get(mode)
        kv.plot([100 * u / pool for u in t["slots_used"]], color=c, label=f"{mode}: filled")
        kv.plot([100 * r / pool for r in t["slots_reserved"]], color=c, ls="--", lw=0.8, label=f"{mode}: reserved")
        run.plot(t["num_running"], color=c, label=mode)
    w = payload["workload"]
    kv.set_title(f"KV usage over time, {w['name']} ({w['num_requests']} requests), same KV budget")
    kv.set_ylabel("% of the pool's token slots")
    kv.set_ylim(0, 105)
    kv.legend(fontsize=8, ncol=2)
    run.set_ylabel("running requests")
    run.set_xlabel("model step")
    run.legend(fontsize=8)
    _footer(fig, payload)
    return _save(fig, path)


# -- kernel bandwidth ------------------------------------------------------------------------------------------
def kernel_bandwidth(payload: dict, path) -> Path:
    """Achieved GB/s per case, one bar per kernel version, against the measured read ceiling (a dashed line)
    and each case's target (a tick), from ``experiments.kernel_bench``'s JSON (other key names tolerated)."""
    plt = _pyplot()
    cases, ceiling = kernel_series(payload), _first_number(payload, CEILING_KEYS)
    if not cases:
        raise cli.FlagError("--kernel-json has no rows with a bandwidth (looked for 'cases'/'rows'/'results' "
                            "holding '<version>_GBps' or 'gbps'/'bandwidth_gbs')")
    names = list(dict.fromkeys(n for _, series, _ in cases for n in series))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(cases) + 2), 4.8))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, [series.get(name, 0.0) for _, series, _ in cases], width, label=SERIES_LABELS.get(name, name))
    targets = [(j, t) for j, (_, _, t) in enumerate(cases) if t and ceiling]
    for k, (j, target) in enumerate(targets):
        ax.plot([j - 0.4, j + 0.4], [ceiling * target / 100] * 2, color="black", lw=1,
                label="kernel 2 target" if k == 0 else None)
    if ceiling:
        ax.axhline(ceiling, color="#c44e52", ls="--", label=f"read ceiling {ceiling:,.0f} GB/s")
        ax.set_ylim(0, 1.22 * ceiling)
    ax.set_xticks(range(len(cases)), [label for label, _, _ in cases], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("K/V bytes read / time (GB/s)")
    gpu = payload.get("gpu") or payload.get("run", {}).get("device", "")
    ax.set_title(f"Paged decode attention bandwidth per case {('on ' + gpu) if gpu else ''}")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    shape = ", ".join(f"{k} {payload[k]}" for k in ("dtype", "head_dim", "block_size") if k in payload)
    fig.text(0.01, 0.005, f"experiments.kernel_bench {payload.get('date', '')}; {shape}", fontsize=7, color="gray")
    return _save(fig, path)


SERIES_LABELS = {"v1": "kernel 1 (two-pass)", "v2": "kernel 2 (one-pass, split-K)",
                 "sdpa": "torch SDPA on contiguous K/V (not paged)"}


ROW_KEYS = ("cases", "rows", "results", "configs", "benchmarks")
BW_KEYS = ("gbps", "GBps", "bandwidth_gbs", "bandwidth_gb_s", "achieved_gbps", "gb_s", "GB/s", "bandwidth")
CEILING_KEYS = ("read_GBps", "read_ceiling_gbs", "ceiling_gbs", "peak_read_gbs", "device_bandwidth_gbs",
                "bandwidth_ceiling_gbs", "read_bandwidth_gbs", "peak_gbs")
LABEL_KEYS = ("batch", "num_seqs", "context", "context_len", "block_size", "head_dim", "num_qo_heads",
              "num_kv_heads", "dtype", "version", "kernel")


def kernel_series(payload: dict) -> list[tuple[str, dict, float | None]]:
    """Per case: (label, {version: GB/s}, target % of the ceiling or None). Versions are the ``<name>_GBps``
    keys of a row (kernel_bench: v1, v2, sdpa), or one unnamed series from a plain bandwidth key."""
    rows = next((payload[k] for k in ROW_KEYS if isinstance(payload.get(k), list)), None)
    if rows is None:
        rows = next((v for v in payload.values() if isinstance(v, list) and v and isinstance(v[0], dict)), [])
    out = []
    for row in (r for r in rows if isinstance(r, dict)):
        series = {k[:-5]: float(v) for k, v in row.items()
                  if k.lower().endswith("_gbps") and _is_number(v) and not math.isnan(v)}
        if not series and (bw := _first_number(row, BW_KEYS)) is not None:
            series = {"achieved": bw}
        if series:
            out.append((_case_label(row), series, row.get("target_pct")))
    return out


def kernel_rows(payload: dict) -> list[tuple[str, float]]:
    """(label, GB/s) of each case's first (or only) version."""
    return [(label, next(iter(series.values()))) for label, series, _ in kernel_series(payload)]


def _case_label(row: dict) -> str:
    if "case" in row or "name" in row:
        return str(row.get("case") or row.get("name"))
    if "batch" in row and "context" in row:
        heads = f", {row['num_qo_heads']}/{row['num_kv_heads']} heads" if "num_qo_heads" in row else ""
        return f"{row['batch']} x {row['context']}{heads}"
    return " ".join(f"{k}={row[k]}" for k in LABEL_KEYS if k in row)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _first_number(d: dict, keys) -> float | None:
    for k in keys:
        if _is_number(d.get(k)):
            return float(d[k])
    for v in d.values():  # one level down, e.g. {"device": {"read_ceiling_gbs": ...}}
        if isinstance(v, dict):
            found = next((float(v[k]) for k in keys if _is_number(v.get(k))), None)
            if found is not None:
                return found
    return None


# -- command line ----------------------------------------------------------------------------------------------
DRAW = {"memory_share": memory_share, "throughput": throughput, "kernel_bench": kernel_bandwidth}
FLAGS = {"memory_share": "--memory-json", "throughput": "--throughput-json", "kernel_bench": "--kernel-json"}
RESULTS = Path("benchmarks") / "results"


def parse_args(argv=None):
    p = cli.Parser(description="Draw PNGs from the experiments' JSON (written with --output-json). Without an "
                               f"input flag, every result in ./{RESULTS} is drawn into --out-dir.")
    group = p.add_mutually_exclusive_group()
    for kind, flag in FLAGS.items():
        group.add_argument(flag, metavar="PATH", help=f"a {kind} JSON")
    p.add_argument("--out", metavar="PATH", help="the PNG to write (default: <input name>.png here)")
    p.add_argument("--out-dir", default="plots", metavar="DIR",
                   help=f"where the PNGs of ./{RESULTS} go when no input is given (default ./plots)")
    args = p.parse_args(argv)
    inputs = [(kind, flag, getattr(args, flag[2:].replace("-", "_"))) for kind, flag in FLAGS.items()]
    args.inputs = [(kind, flag, Path(src)) for kind, flag, src in inputs if src]
    if args.out and not args.inputs:
        raise cli.FlagError("--out needs an input (--memory-json, --throughput-json or --kernel-json)")
    return args


def _kind(path: Path, payload) -> str | None:
    """Which experiment wrote ``payload``: its ``experiment`` key, else the file name's prefix."""
    named = payload.get("experiment") if isinstance(payload, dict) else None
    return named if named in DRAW else next((k for k in DRAW if path.name.startswith(k)), None)


def _load(src: Path, flag: str):
    try:
        return json.loads(Path(src).read_text())
    except (OSError, ValueError) as exc:
        raise cli.FlagError(f"{flag} must be a readable JSON file, got {src} ({type(exc).__name__})") from None


def _jobs(args) -> list[tuple[str, str, Path, Path]]:
    """(kind, flag, input, output PNG) for each figure to draw, outputs checked writable."""
    if args.inputs:
        (kind, flag, src), = args.inputs
        jobs = [(kind, flag, src, Path(args.out or src.with_suffix(".png").name))]
    else:
        found = sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []
        jobs = [(k, "input", src, Path(args.out_dir) / src.with_suffix(".png").name) for src in found
                if (k := _kind(src, {})) is not None]
        if not jobs:
            raise cli.FlagError(f"nothing to draw: no input flag and no experiment JSON in ./{RESULTS}; run e.g. "
                                "python -m experiments.memory_share --output-json memory.json, then "
                                "python -m experiments.plots --memory-json memory.json")
    for _, _, _, out in jobs:
        cli.check_output_path(out, "--out" if args.inputs else "--out-dir")
    return jobs


def draw(kind: str, flag: str, src: Path, out: Path) -> Path:
    """One figure; a JSON of the wrong structure is a one-line :class:`cli.FlagError`, not a KeyError."""
    payload = _load(src, flag)
    if not isinstance(payload, dict):
        raise cli.FlagError(f"{flag} {src} must hold a JSON object, got {type(payload).__name__}")
    try:
        return DRAW[kind](payload, out)
    except cli.FlagError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        _pyplot().close("all")
        raise cli.FlagError(f"{flag} {src} is not a {kind} JSON ({type(exc).__name__}: {exc})") from None


@cli.guarded
def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = _jobs(args)
    check_available("--out")  # NOTE: after the input checks, so a bad path is reported the same with or without it
    for kind, flag, src, out in jobs:
        print(f"wrote {draw(kind, flag, src, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
