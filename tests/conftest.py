"""Shared pytest setup: Hypothesis profiles and the ``gpu`` marker's skip rule."""
import os

import pytest
from hypothesis import HealthCheck, settings

from pagedkv.backend import gpu_status

# "ci" keeps the whole suite well under 5 minutes on 2 cores; "dev" digs deeper.
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    usable, reason = gpu_status()
    if usable:
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
