"""A byte-level BPE tokenizer trained on the spot: text for models with random weights (presets, tests).

``train_tokenizer(folder, vocab_size)`` trains on a small built-in corpus (English, accents, CJK, emoji), then,
if the corpus ran out of merges before ``vocab_size``, adds synthetic merges (``"Ġ"`` + letters, then letter
strings) so the vocabulary has exactly ``vocab_size`` ids and every id decodes to text. It writes
``tokenizer.json`` and ``tokenizer_config.json`` (ChatML special tokens and chat template), the files
:meth:`pagedkv.text.Tokenizer.from_folder` reads.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from .extras import require
from .tokenizer import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in fixed-size blocks.",
    "A block table maps each sequence's logical blocks to physical blocks anywhere in the pool.",
    "Copy-on-write: forked sequences share their prompt blocks until one of them writes.",
    "Café, naïve, résumé, façade, jalapeño, Ærøskøbing, Straße — accents are two UTF-8 bytes.",
    "中文字符需要三个字节。日本語のテキストも同じです。한국어 문장도 있습니다.",
    "Emoji take four bytes: 😀 🚀 🎉 👍🏽 and flags 🇫🇷 🇯🇵.",
    "def step(self):\n    return [r.output() for r in self.requests]\n",
    "Numbers 0123456789, punctuation !?.,;:'\"()[]{}<>, and  double  spaces\tand tabs.",
]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(folder, vocab_size: int, *, corpus=None, chat_template: str = CHATML_TEMPLATE) -> Tokenizer:
    """Train, pad to exactly ``vocab_size`` ids, save into ``folder``, and return the loaded tokenizer.

    Raises:
        ValueError: ``vocab_size`` below 256 bytes + the special tokens.
    """
    tokenizers = require("tokenizers", "training a tokenizer")
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB} (256 bytes + special tokens), got {vocab_size!r}")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus or CORPUS) * 4, trainer)
    data = json.loads(tok.to_str())
    _pad_merges(data["model"], vocab_size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "chat_template": chat_template,
              "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
    loaded = Tokenizer.from_folder(folder)
    if loaded.vocab_size != vocab_size:  # NOTE: a real check, not an assert: the caller sizes a model by it
        raise RuntimeError(f"trained tokenizer has {loaded.vocab_size} ids, wanted {vocab_size}")
    return loaded


def _pad_merges(model: dict, vocab_size: int) -> None:
    """Add merges ``(s, c)`` -> ``s + c`` over letters until the BPE vocabulary has ``vocab_size`` entries."""
    vocab, merges = model["vocab"], model["merges"]
    next_id = max(vocab.values()) + 1
    queue = ["Ġ", *string.ascii_lowercase]
    head = 0
    while len(vocab) < vocab_size:
        stem = queue[head]
        head += 1
        for c in string.ascii_lowercase:
            if len(vocab) >= vocab_size:
                break
            token = stem + c
            if token in vocab:
                continue
            merges.append([stem, c] if not merges or isinstance(merges[0], list) else f"{stem} {c}")
            vocab[token] = next_id
            next_id += 1
            queue.append(token)
