"""The README's code example runs as written and prints what its comments say."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_matches_its_comments():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert printed.getvalue().split() == "[[0 1 2] [0 1 3]] 1 2".split()


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(module, args)`` of every ``python -m experiments.NAME ...`` or ``python -m pagedkv.experiments.NAME ...``
    in the README's bash blocks (continuation lines joined)."""
    import shlex

    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for m in re.finditer(r"python -m (?:pagedkv\.)?experiments\.(\w+)([^&;#|]*)", line):
                found.append((m.group(1), shlex.split(m.group(2))))
    return found


def test_readme_experiment_commands_parse_as_written():
    """Every flag of every README command exists and holds a valid value (parsed without running)."""
    import importlib
    import sys

    root = str(README.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    commands = readme_commands()
    assert {m for m, _ in commands} >= {"memory_share", "throughput", "engine_bench"}
    for module, args in commands:
        mod = importlib.import_module(f"experiments.{module}")
        if hasattr(mod, "parse_args"):
            mod.parse_args(args)  # a bad flag exits 2 here, failing the test
        else:
            assert args == [], (module, args)
