"""The installed distribution: a non-editable ``pip install .`` ships the CUDA sources and the experiments.

Each check runs in a fresh, isolated interpreter (``python -I``) started outside the source tree, so it sees
the *installed* ``pagedkv`` and never the checkout (nor a ``pagedkv.egg-info`` that a build left in it).
The checks skip where pagedkv is not installed, or installed in editable mode (which reads the checkout);
CI (``.ci/run``) installs it non-editable, so there they run.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, pagedkv
from pagedkv.kernels import compile
folder = compile.cu_dir()
print(json.dumps({"package": pagedkv.__file__, "folder": str(folder),
                  "files": sorted(p.name for p in folder.iterdir()),
                  "source_chars": len(compile.cu_source("paged_attention.cu"))}))
"""


WHERE = """
import json
from importlib import metadata
try:
    dist = metadata.distribution("pagedkv")
except metadata.PackageNotFoundError:
    print("null")
else:
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    print(json.dumps({"editable": url.get("dir_info", {}).get("editable", False),
                      "package": str(dist.locate_file("pagedkv"))}))
"""


def installed_package(tmp_path) -> Path:
    """The installed pagedkv folder as an isolated interpreter outside the checkout sees it, or a skip."""
    found = json.loads(isolated("-c", WHERE, cwd=tmp_path).stdout or "null")
    if found is None:
        pytest.skip("pagedkv is not installed in this interpreter (tests run from a bare checkout)")
    if found["editable"]:
        pytest.skip("pagedkv is installed in editable mode: it reads a checkout")
    return Path(found["package"])


def isolated(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-I", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_installed_distribution_ships_the_cu_files(tmp_path):
    sources = sorted(p.name for p in (REPO / "kernels_cu").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources, "no kernels_cu/*.cu in the source tree"
    installed_package(tmp_path)
    run = isolated("-c", PROBE, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    installed = Path(found["package"]).resolve().parent
    assert installed != REPO / "pagedkv"
    assert Path(found["folder"]) == installed / "kernels_cu", found  # importable as pagedkv.kernels_cu
    missing = [name for name in sources if name not in found["files"]]
    assert not missing, f"kernels_cu files not in the installed package {installed}: {missing}"
    assert found["source_chars"] > 1000  # common.cuh inlined into paged_attention.cu


def test_installed_experiments_run_from_any_folder_and_write_only_where_asked(tmp_path):
    package = installed_package(tmp_path)
    sources = sorted(p.name for p in (REPO / "experiments").glob("*.py"))
    shipped = sorted(p.name for p in (package / "experiments").glob("*.py"))
    assert shipped == sources
    before = sorted(p for p in package.rglob("*") if "__pycache__" not in p.parts)
    from experiments import BENCHMARKS

    for name, _ in BENCHMARKS.values():
        run = isolated("-m", f"pagedkv.experiments.{name}", "--help", cwd=tmp_path, timeout=60)
        # issue 20: the usage line names the module as it was run, not the checkout's experiments.NAME
        assert run.returncode == 0 and f"usage: python -m pagedkv.experiments.{name}" in run.stdout, (name, run)
    run = isolated("-m", "pagedkv.experiments.throughput", "--device", "cpu", "--num-prompts", "6", "--scale",
                   "0.05", "--output-json", "results/tp.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "results" / "tp.json").read_text())["outputs"]["identical"]
    run = isolated("-m", "pagedkv.experiments.memory_share", "--device", "cpu", "--num-requests", "2",
                   "--num-branches", "2", "--prompt-len", "20", "--gen-len", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["results", "tp.json"]  # nothing written unasked
    after = sorted(p for p in package.rglob("*") if "__pycache__" not in p.parts)
    assert after == before  # nothing written into the installed package


def test_license_file_is_mit_and_ships():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the pagedkv authors" in text
    assert "license = MIT" in (REPO / "setup.cfg").read_text()


def test_one_version_and_type_information_ship(tmp_path):
    """Issue 20: the version is written once (pagedkv/__init__.py; setup.cfg reads it) and py.typed ships."""
    assert "version = attr: pagedkv.__version__" in (REPO / "setup.cfg").read_text()
    package = installed_package(tmp_path)
    assert (package / "py.typed").is_file()
    run = isolated("-c", "import pagedkv; from importlib import metadata; "
                   "print(pagedkv.__version__, metadata.version('pagedkv'))", cwd=tmp_path)
    installed, declared = run.stdout.split()
    assert installed == declared
    assert f"## {installed}" in (REPO / "CHANGELOG.md").read_text()


def test_console_script_runs_the_benchmarks_by_their_bench_names(tmp_path):
    """Issue 20: ``pagedkv bench NAME`` runs an experiment and its usage line names it so."""
    installed_package(tmp_path)
    script = Path(sys.executable).parent / "pagedkv"
    if not script.is_file():
        pytest.skip("no pagedkv console script next to this interpreter")
    run = subprocess.run([str(script), "bench", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "bench throughput" in run.stdout and "bench kernels" in run.stdout, run
    run = subprocess.run([str(script), "bench", "latency", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("usage: pagedkv bench latency"), run
    run = subprocess.run([str(script), "bench", "nosuch"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith("error: unknown benchmark 'nosuch'"), run
