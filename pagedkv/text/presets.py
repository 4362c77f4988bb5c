"""Tokenizers of the model presets that ship one: ``"small"`` gets a byte-level BPE trained once per process
on text shipped in the package (``pagedkv/text/data/corpus.txt``), with exactly the preset's vocabulary."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

CORPUS = Path(__file__).with_name("data") / "corpus.txt"
PRESET_TOKENIZERS = {"small": 2048}  # preset name -> vocabulary size


def preset_tokenizer(name: str):
    """The preset's tokenizer (a :class:`pagedkv.text.Tokenizer`), or None for presets without one."""
    if name not in PRESET_TOKENIZERS:
        return None
    return _trained(name)


@functools.lru_cache(maxsize=None)
def _trained(name: str):
    from .train import train_tokenizer

    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix=f"pagedkv-{name}-tok-") as folder:
        return train_tokenizer(folder, PRESET_TOKENIZERS[name], corpus=lines)
