"""Shared pytest setup: Hypothesis profiles and the ``gpu`` marker's skip rule."""
import os

import pytest
from hypothesis import HealthCheck, settings

from pagedkv.backend import gpu_status

# "ci" keeps the whole suite well under 5 minutes on 2 cores; "dev" digs deeper.
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

GPU_SKIP = "no usable GPU: "


def pytest_collection_modifyitems(config, items):
    usable, reason = gpu_status()
    if usable:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP + reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)



def pytest_terminal_summary(terminalreporter):
    """Skips in one place: the GPU tests a CPU run skips are one line, every other skip its own line.

    NOTE: setup.cfg's ``addopts`` leaves skips out of ``-r`` (pytest would list every GPU test's location)."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = [str(r.longrepr[2]) if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped]
    gpu = [r for r in reasons if r.startswith("Skipped: " + GPU_SKIP) or r.startswith(GPU_SKIP)]
    if gpu:
        why = gpu[0].split(GPU_SKIP, 1)[1]
        terminalreporter.write_line(f"SKIPPED {len(gpu)} GPU tests: no usable GPU ({why})")
    for report, reason in zip(skipped, reasons):
        if reason not in gpu:
            terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason.removeprefix('Skipped: ')}")
