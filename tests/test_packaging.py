"""The installed distribution ships the CUDA sources: a non-editable ``pip install .`` must find them."""
import importlib.metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_installed_distribution_ships_the_cu_files():
    sources = sorted(p.name for p in (REPO / "kernels_cu").glob("*.cu"))
    if not sources:
        pytest.skip("no kernels_cu/*.cu in the source tree yet")
    try:
        dist = importlib.metadata.distribution("pagedkv")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pagedkv is not installed as a distribution (run from a source checkout)")
    files = dist.files
    assert files is not None, "the installed pagedkv has no RECORD: cannot tell what it ships"
    shipped = {f.name: f for f in files if f.name.endswith(".cu")}
    if not shipped and (dist.read_text("direct_url.json") or "").find('"editable": true') >= 0:
        pytest.skip("an editable install lists no package data in its RECORD")
    missing = [name for name in sources if name not in shipped]
    assert not missing, f"kernels_cu files not in the installed package: {missing}"
    for name in sources:
        f = shipped[name]
        assert f.parts[:2] == ("pagedkv", "kernels_cu"), f  # importable as pagedkv.kernels_cu
        located = Path(dist.locate_file(f))
        assert located.is_file() and located.stat().st_size > 0, located
