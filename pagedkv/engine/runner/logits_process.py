"""vLLM's logits processors on the device: penalties, logit_bias, bad_words, allowed_token_ids, min_tokens, and
grammar bitmasks (``kernels_cu/logits_process.cu``); the per-sequence token counts they read; the NumPy twin.

One step, in stream order (the first two inside the captured graph)::

    process_logits   rows with flags & PROCESS: float32 copy of the row with masks, bias, bans and penalties
                     -> processed[proc_row]                                    (other rows: nothing, no copy)
    sample           a processed row samples from its copy, every other row from the raw logits
    count_tokens     rows with flags & UPDATE: counts[state_row][token] += 1; history[state_row][step % H]

A sequence whose parameters need state (:func:`needs_state`) owns the state row of its SequenceTables row:
prompt bits, output counts, the last ``HISTORY`` output tokens, its lists (``request_words``) and its allowed
bitmask, written when the row is made (:meth:`LogitsState.init_row`: from the host's tokens, and from the
device's sampled buffer for a token still in flight). Log-probabilities stay those of the raw logits (vLLM's
default ``raw_logprobs``).

NOTE: memory: ``counts`` is ``int32 [rows, V]`` and ``processed`` ``float32 [max_num_seqs, V]`` (128 MiB each
for V = 128256 and 256 rows); both are allocated at the first request that needs them (captured graphs are
then recaptured once), never for a run without penalties or grammars.

Over 400 lines because the device state, its launchers and the NumPy twin of each kernel stay side by side
(the twin is the CPU path and the GPU test's oracle, line for line).
"""
from __future__ import annotations

import numpy as np

from ...backend import array_module
from ...sampling_params import SamplingParams

PROCESS, STATE, UPDATE, MASK = 1, 2, 4, 8  # flags (PAGEDKV_LP_* in logits_process.cu)
HEADER = 8  # PAGEDKV_LP_HEADER
HISTORY = 16  # output tokens kept per sequence: a bad word has at most HISTORY + 1 tokens
PROMPT_BIT, COUNT_MASK = 0x40000000, 0x3FFFFFFF
LIST_WORDS = 4096  # int32 words of a sequence's lists (logit_bias pairs, stop ids, bad words)
_SUFFIX = {0: "f32", 1: "f16", 2: "bf16"}


def needs_state(params: SamplingParams) -> bool:
    return (params.has_penalties or bool(params.logit_bias) or bool(params.bad_words) or params.min_tokens > 0
            or params.allowed_token_ids is not None)


def processes(params: SamplingParams) -> bool:
    """The branch's rows are processed (state, or a grammar's bitmask)."""
    return needs_state(params) or params.structured_outputs is not None


class RequestLists:
    """Each request's lists row (:func:`request_words`), computed once per SamplingParams object.

    ``eos_token_ids`` (masked with the stop ids while ``min_tokens`` is not reached) and ``tokenizer`` (for
    ``bad_words``) are the engine's; both may be set after construction.
    """

    def __init__(self, vocab_size: int, eos_token_ids=(), tokenizer=None):
        self.vocab_size, self.eos_token_ids, self.tokenizer = vocab_size, frozenset(eos_token_ids), tokenizer
        self._cache: dict[int, tuple] = {}

    def words(self, params: SamplingParams) -> np.ndarray:
        """Raises ``ValueError`` (token ids outside the vocabulary, bad words without a tokenizer, too long)."""
        hit = self._cache.get(id(params))
        if hit is not None and hit[0] is params:
            return hit[1]
        bad = []
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError(f"bad_words {params.bad_words!r} need a tokenizer on the engine")
            bad = bad_words_token_ids(params.bad_words, self.tokenizer)
        stop_ids = () if params.ignore_eos else self.eos_token_ids
        words = request_words(params, self.vocab_size, sorted({*stop_ids, *params.stop_token_ids}), bad)
        if len(self._cache) > 4096:  # NOTE: keyed by id(): entries of finished requests are dropped in bulk
            self._cache.clear()
        self._cache[id(params)] = (params, words)
        return words


def bad_words_token_ids(bad_words, tokenizer) -> list[list[int]]:
    """vLLM's tokenization of ``bad_words``: each word as written (leading spaces stripped) and, when it
    tokenizes differently at the same length, with one leading space."""
    out = []
    for word in bad_words:
        for prefix in ("", " "):
            ids = tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
            if not ids:
                continue
            if prefix == "" or (out and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(list(ids))
    return out


def request_words(params: SamplingParams, vocab_size: int, stop_ids, bad_word_ids) -> np.ndarray:
    """int32 [HEADER + data]: the sequence's lists row (see logits_process.cu). ``stop_ids``: EOS + the
    request's stop_token_ids (masked while ``min_tokens`` is not reached). Raises ``ValueError`` for token ids
    outside ``[0, vocab_size)``, a bad word longer than ``HISTORY + 1`` tokens or lists over ``LIST_WORDS``."""
    for name, ids in (("logit_bias", list(params.logit_bias or ())), ("allowed_token_ids",
                      params.allowed_token_ids or ()), ("bad_words", [t for w in bad_word_ids for t in w])):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    long = [w for w in bad_word_ids if len(w) > HISTORY + 1]
    if long:
        raise ValueError(f"bad_words has a word of {len(long[0])} tokens; at most {HISTORY + 1}")
    stop_ids = sorted({int(t) for t in stop_ids if 0 <= t < vocab_size}) if params.min_tokens else []
    bias = params.logit_bias or {}
    header = [len(bias), len(stop_ids), len(bad_word_ids), int(params.allowed_token_ids is not None),
              params.min_tokens] + [_bits(getattr(params, f)) for f in
                                    ("presence_penalty", "frequency_penalty", "repetition_penalty")]
    data = [w for t, b in bias.items() for w in (t, _bits(b))] + stop_ids + \
        [w for ids in bad_word_ids for w in (len(ids), *ids)]
    if HEADER + len(data) > LIST_WORDS:
        raise ValueError(f"logit_bias, bad_words and min_tokens' stop ids need {HEADER + len(data)} words; at most "
                         f"{LIST_WORDS}")
    return np.array(header + data, dtype=np.int32)


def _bits(x: float) -> int:
    return int(np.float32(x).view(np.int32))


def allowed_bitmask(ids, vocab_size: int) -> np.ndarray:
    """uint32 [ceil(V / 32)]: bit i set for each id."""
    bits = np.zeros(-(-vocab_size // 32) * 32, dtype=bool)
    bits[np.asarray(ids, dtype=np.int64)] = True
    return np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)


class LogitsState:
    """Per-sequence device state (``capacity`` rows) and the processed-row buffer (``proc_rows`` rows).

    ``counts [capacity, V] int32``, ``history [capacity, HISTORY] int32``, ``lists [capacity, LIST_WORDS]
    int32``, ``allowed [capacity, W] uint32``, ``processed [proc_rows, V] float32``, ``grammar [proc_rows, W]
    uint32`` (the step's grammar bitmasks, rows named by ``mask_row``). ``version`` grows at each allocation
    (captured graphs hold the old pointers).
    """

    def __init__(self, vocab_size: int, proc_rows: int, xp):
        self.vocab_size, self.proc_rows, self.xp = vocab_size, proc_rows, xp
        self.words = -(-vocab_size // 32)
        self.capacity, self.version = 0, 0
        self.counts = self.history = self.lists = self.allowed = self.processed = self.grammar = None

    @property
    def allocated(self) -> bool:
        return self.counts is not None

    def ensure(self, capacity: int) -> None:
        """Room for ``capacity`` sequence rows (old rows kept)."""
        if capacity <= self.capacity:
            return
        xp, v = self.xp, self.vocab_size
        new = {"counts": (v, np.int32), "history": (HISTORY, np.int32), "lists": (LIST_WORDS, np.int32),
               "allowed": (self.words, np.uint32)}
        for name, (width, dtype) in new.items():
            array = xp.zeros((capacity, width), dtype=dtype)
            if getattr(self, name) is not None:
                array[:self.capacity] = getattr(self, name)
            setattr(self, name, array)
        if self.processed is None:
            self.processed = xp.zeros((self.proc_rows, v), dtype=np.float32)
            self.grammar = xp.zeros((self.proc_rows, self.words), dtype=np.uint32)
        self.capacity, self.version = capacity, self.version + 1

    def init_row(self, row: int, words: np.ndarray, prompt_ids, outputs, srcs, allowed_ids, sampled) -> None:
        """Row ``row`` for a sequence: lists ``words``; counts from ``prompt_ids`` and ``outputs`` (host ints;
        ``srcs[j] >= 0``: output j is still in flight, its value is ``sampled[srcs[j]]`` on the device)."""
        xp = self.xp
        self.lists[row, :len(words)] = xp.asarray(words)
        if allowed_ids is not None:
            self.allowed[row] = xp.asarray(allowed_bitmask(allowed_ids, self.vocab_size))
        counts = self.counts[row]
        counts[...] = 0
        counts[xp.asarray(np.unique(np.asarray(prompt_ids, dtype=np.int64)))] = PROMPT_BIT
        if len(outputs):
            src = np.asarray(srcs, dtype=np.int64)
            values = xp.asarray(np.asarray(outputs, dtype=np.int64))
            if (src >= 0).any():
                d_src = xp.asarray(src)
                values = xp.where(d_src >= 0, sampled[xp.maximum(d_src, 0)].astype(np.int64), values)
            _scatter_add(counts, values)
            tail = max(0, len(outputs) - HISTORY)
            self.history[row, xp.asarray(np.arange(tail, len(outputs)) % HISTORY)] = values[tail:].astype(np.int32)


def _scatter_add(counts, values) -> None:
    xp = array_module(counts)
    if xp is np:
        np.add.at(counts, values, 1)
    else:
        import cupyx

        cupyx.scatter_add(counts, values, np.int32(1))


# ---- launches (CuPy) and the NumPy twin ------------------------------------------------------------------

def process(logits, tensors, state: LogitsState, dt: int, processed=None) -> None:
    """Rows with ``flags & PROCESS`` of ``logits [B, V]`` into ``processed`` (default ``state.processed``)."""
    processed = state.processed if processed is None else processed
    if array_module(logits) is np:
        for r in np.flatnonzero(tensors.flags[:logits.shape[0]] & PROCESS):
            processed[tensors.proc_row[r]] = process_row(logits[r], state, int(tensors.flags[r]),
                                                         int(tensors.state_row[r]), int(tensors.mask_row[r]),
                                                         int(tensors.step[r]))
        return
    import cupy

    from ...kernels.compile import load_function

    num_rows, vocab = logits.shape
    row_stride = logits.strides[0] // logits.itemsize if num_rows > 1 else vocab
    t = tensors
    load_function("logits_process.cu", f"process_logits_{_SUFFIX[dt]}")(
        (num_rows,), (256,), (processed, logits, cupy.int64(row_stride), cupy.int32(vocab), t.flags, t.proc_row,
                              t.state_row, t.mask_row, t.step, state.counts, state.history, cupy.int32(HISTORY),
                              state.lists, cupy.int32(LIST_WORDS), state.allowed, state.grammar,
                              cupy.int32(state.words)))


def count_tokens(tokens, tensors, state: LogitsState) -> None:
    """Rows with ``flags & UPDATE``: the sampled ``tokens [B]`` into their sequence's counts and history."""
    num = tokens.shape[0]
    if num == 0:
        return
    t = tensors
    if array_module(tokens) is np:
        for r in np.flatnonzero(t.flags[:num] & UPDATE):
            s = int(t.state_row[r])
            state.counts[s, tokens[r]] += 1
            state.history[s, int(t.step[r]) % HISTORY] = tokens[r]
        return
    import cupy

    from ...kernels.compile import load_function

    load_function("logits_process.cu", "count_tokens")(
        (-(-num // 128),), (128,), (tokens, t.flags, t.state_row, t.step, state.counts, state.history,
                                    cupy.int32(HISTORY), cupy.int32(state.vocab_size), cupy.int32(num)))


def process_row(x, state: LogitsState, flags: int, s: int, mask_row: int, step: int) -> np.ndarray:
    """The kernel's arithmetic for one row (NumPy, float32): ``x [V]`` float32 logits."""
    y = np.asarray(x, dtype=np.float32).copy()
    keep = np.ones(y.size, dtype=bool)
    if flags & MASK:
        keep &= _unpack(state.grammar[mask_row], y.size)
    hdr = state.lists[s] if flags & STATE else None
    if hdr is not None and hdr[3]:
        keep &= _unpack(state.allowed[s], y.size)
    y[~keep] = -np.inf
    if hdr is None:
        return y
    n_bias, n_stop, n_bad, _, min_tokens = (int(v) for v in hdr[:5])
    pres, freq, rep = hdr[5:8].view(np.float32)
    data = hdr[HEADER:]
    ids = data[:2 * n_bias:2].astype(np.int64)
    y[ids] = y[ids] + data[1:2 * n_bias:2].view(np.float32)
    y = penalize(y, state.counts[s], pres, freq, rep)
    if step < min_tokens:
        y[data[2 * n_bias:2 * n_bias + n_stop]] = -np.inf
    w, hist = 2 * n_bias + n_stop, state.history[s]
    for _ in range(n_bad):
        n = int(data[w])
        prefix = data[w + 1:w + n]
        if n - 1 <= step and all(hist[(step - (n - 1) + j) % HISTORY] == prefix[j] for j in range(n - 1)):
            y[data[w + n]] = -np.inf
        w += n + 1
    return y


def penalize(y: np.ndarray, counts: np.ndarray, pres, freq, rep) -> np.ndarray:
    """float32: the kernel's penalties of ``y [V]`` given the counts row (prompt bit | output count)."""
    n = (counts & COUNT_MASK).astype(np.float32)
    rep = np.float32(rep)
    if rep != 1:
        seen = counts != 0
        y = np.where(seen, np.where(y > 0, y / rep, y * rep), y).astype(np.float32)
    y = y - np.float32(freq) * n
    return (y - np.where(n > 0, np.float32(pres), np.float32(0))).astype(np.float32)


def _unpack(mask: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(np.asarray(mask, dtype="<u4").view(np.uint8), bitorder="little")[:vocab].astype(bool)
