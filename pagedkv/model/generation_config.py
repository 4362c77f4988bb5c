"""How a checkpoint's authors configured generation: EOS ids and sampling defaults.

``read_generation_config(folder)`` merges ``config.json`` and ``generation_config.json`` (either may name
``eos_token_id`` as an int or a list, as Llama 3 does) into a :class:`GenerationConfig`:

    eos_token_ids   every EOS id of both files, config.json's first (NOTE: the union, as vLLM stops on the
                    tokenizer's EOS and on generation_config's ids alike)
    bos/pad         generation_config.json's value, else config.json's (a negative pad id means "none")
    defaults        generation_config.json's sampling keys under SamplingParams' names:
                    temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens -> max_tokens,
                    min_new_tokens -> min_tokens; do_sample: false -> temperature 0

Keys pagedkv cannot honour (``max_length``, ``num_beams`` > 1, ``no_repeat_ngram_size``,
``encoder_repetition_penalty``, ``bad_words_ids``, ...) are not applied; each gets a line in ``notes``. Every value is checked for type and range (token ids within the
vocabulary) and a bad one raises ``ValueError`` naming the file and the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..sampling_params import MIN_TEMPERATURE
from .hf_config import Fields, read_json_object

TOKEN_KEYS = ("eos_token_id", "bos_token_id", "pad_token_id")


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """EOS/BOS/PAD ids and sampling defaults (``SamplingParams`` field names → values)."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    defaults: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        ids = [*self.eos_token_ids, *(i for i in (self.bos_token_id, self.pad_token_id) if i is not None)]
        if not isinstance(self.eos_token_ids, tuple) or not all(type(i) is int and i >= 0 for i in ids):
            raise ValueError(f"token ids must be ints >= 0 (eos a tuple), got eos={self.eos_token_ids!r}, "
                             f"bos={self.bos_token_id!r}, pad={self.pad_token_id!r}")
        unknown = set(self.defaults) - {"temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens",
                                        "repetition_penalty"}
        if not isinstance(self.defaults, dict) or unknown:
            raise ValueError(f"defaults must map SamplingParams fields to values, got {self.defaults!r}")


def read_generation_config(folder: str | Path) -> GenerationConfig:
    """Merge ``folder/config.json`` (required) and ``folder/generation_config.json`` (optional)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json")
    model = Fields(read_json_object(folder / "config.json"), str(folder / "config.json"))
    vocab = model.int("vocab_size", None)
    gen_path = folder / "generation_config.json"
    gen = Fields(read_json_object(gen_path) if gen_path.exists() else {}, str(gen_path))
    eos = list(dict.fromkeys(_ids(model, "eos_token_id", vocab) + _ids(gen, "eos_token_id", vocab)))
    notes: list[str] = []
    tokens = {}
    for key in ("bos_token_id", "pad_token_id"):
        found = [_one_id(f, key, vocab, notes) for f in (gen, model) if f.present(key)]
        tokens[key] = next((i for i in found if i is not None), None)
    defaults = _defaults(gen, notes)
    return GenerationConfig(tuple(eos), tokens["bos_token_id"], tokens["pad_token_id"], defaults, tuple(notes))


def _check_id(f: Fields, key: str, value, vocab: int | None) -> int:
    if type(value) is not int or value < 0 or (vocab is not None and value >= vocab):
        f.fail(key, f"a token id in [0, {vocab if vocab is not None else 'vocab_size'})", value)
    return value


def _ids(f: Fields, key: str, vocab: int | None) -> list[int]:
    """An id or a list of ids (possibly empty), each within the vocabulary."""
    value = f.get(key, [])
    values = value if isinstance(value, list) else [value]
    return [_check_id(f, key, v, vocab) for v in values]


def _one_id(f: Fields, key: str, vocab: int | None, notes: list) -> int | None:
    value = f.obj[key]
    if key == "pad_token_id" and type(value) is int and value < 0:  # NOTE: some exports write -1 for "none"
        notes.append(f"{f.source}: pad_token_id {value} read as no padding token")
        return None
    return _check_id(f, key, value, vocab)


def _defaults(f: Fields, notes: list) -> dict:
    """generation_config.json's sampling keys under SamplingParams' names, each range-checked."""
    out = {}
    if f.present("temperature"):
        out["temperature"] = f.float("temperature", lo=0.0, lo_open=False)
        if 0 < out["temperature"] < MIN_TEMPERATURE:
            notes.append(f"{f.source}: temperature {out['temperature']:g} is below {MIN_TEMPERATURE:g}: greedy")
            out["temperature"] = 0.0
    if f.present("top_p"):
        out["top_p"] = f.float("top_p")
        if out["top_p"] > 1:
            f.fail("top_p", "in (0, 1]", out["top_p"])
    if f.present("min_p"):
        out["min_p"] = f.float("min_p", lo=0.0, lo_open=False)
        if out["min_p"] > 1:
            f.fail("min_p", "in [0, 1]", out["min_p"])
    if f.present("top_k"):
        top_k = f.int("top_k", lo=0)
        out["top_k"] = top_k if top_k > 0 else -1  # Hugging Face: 0 disables it
    if f.present("max_new_tokens"):
        out["max_tokens"] = f.int("max_new_tokens")
    if f.present("min_new_tokens"):
        out["min_tokens"] = f.int("min_new_tokens", lo=0)
    if f.present("repetition_penalty"):
        out["repetition_penalty"] = f.float("repetition_penalty")  # > 0, finite (vLLM reads it too)
    if not f.bool("do_sample", True):
        out["temperature"] = 0.0
        notes.append(f"{f.source}: do_sample false: greedy decoding (temperature 0) by default")
    _not_honoured(f, notes)
    return out


NOT_HONOURED = {"no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
                "bad_words_ids": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
                "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_length": 0,
                "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
                "forced_eos_token_id": None}  # key -> its no-op value


def _not_honoured(f: Fields, notes: list) -> None:
    for key, off in NOT_HONOURED.items():
        if f.present(key) and f.obj[key] != off:
            notes.append(f"{f.source}: {key} {f.obj[key]!r} ignored (pagedkv has no such sampling option)")
    if f.present("max_length"):
        notes.append(f"{f.source}: max_length {f.int('max_length')} ignored (set max_tokens per request)")
    if f.present("num_beams") and f.int("num_beams") > 1:
        notes.append(f"{f.source}: num_beams {f.obj['num_beams']} ignored (beam search is LLM.beam_search)")
