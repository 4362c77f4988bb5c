"""Structured outputs through llguidance: grammars compiled when a request is added, one matcher per branch,
the step's token bitmasks filled on the host and applied on the device (``logits_process.cu``, MASK rows).

Why llguidance (not xgrammar): a self-contained wheel (Rust, no torch: pagedkv is CuPy-only and xgrammar's
Python package needs torch), NumPy bitmasks filled in place (``fill_next_token_bitmask[_par]``), JSON schema,
regex, Lark grammars and choice; masks are computed lazily per token (no whole-grammar precompilation step).
See experiments/structured_bench.py for the per-token mask timing of both.

    add_request     params.structured_outputs -> grammar text (cached by its key) -> validated against the
                    tokenizer: a grammar that does not compile is refused with one line (StructuredOutputsError)
    each step       each sampling row of a structured request: its branch's matcher consumes the branch's new
                    tokens, fills bitmask row k; row flags |= PROCESS | MASK, mask_row = k; one host->device
                    copy of the k rows
    end             EOS is allowed exactly when the grammar accepts (llguidance); a matcher in error allows EOS only

With asynchronous scheduling a structured row of step N + 1 is launched before its previous token (step N) is on
the host: the forward (and the sampler, without the mask) runs at once, and once step N is retired the row's mask
is filled while the GPU still runs that forward, then the row is sampled again with it (ModelRunner.finish).
"""
from __future__ import annotations

import json
import re

import numpy as np

from ...structured_params import StructuredOutputsError, StructuredOutputsParams


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError as exc:
        raise StructuredOutputsError("structured outputs need llguidance (pip install 'pagedkv[structured]')") \
            from exc
    return llguidance


def grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar (its JSON envelope) for ``params``."""
    llg = _llguidance()
    matcher = llg.LLMatcher
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        schema = json.loads(schema) if isinstance(schema, str) else dict(schema)
        if params.disable_additional_properties and isinstance(schema, dict):
            schema = _no_additional_properties(schema)
        options = {"whitespace_flexible": not params.disable_any_whitespace}
        if params.whitespace_pattern is not None:
            options["item_separator"] = params.whitespace_pattern  # NOTE: llguidance has no free whitespace regex
        try:
            return matcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        except Exception as exc:  # NOTE: llguidance raises ValueError/RuntimeError on a bad schema
            raise StructuredOutputsError(f"structured_outputs.json does not compile: {_line(exc)}") from None
    if kind == "regex":
        return matcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return matcher.grammar_from_regex("(" + "|".join(re.escape(c) for c in params.choice) + ")")
    return matcher.grammar_from_lark(params.grammar)


def _no_additional_properties(schema: dict) -> dict:
    out = {k: (_no_additional_properties(v) if isinstance(v, dict) else
               [_no_additional_properties(x) if isinstance(x, dict) else x for x in v] if isinstance(v, list) else v)
           for k, v in schema.items()}
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _line(exc) -> str:
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


class Grammars:
    """Compiled grammars of one tokenizer (cached by the params' key) and the matchers of live branches.

    Args:
        tokenizer: a ``pagedkv.text.Tokenizer``; vocab_size: the model's (bitmask width ``ceil(V / 32)``);
        eos_token_ids: what the grammar allows at its end (the engine's EOS ids, else the tokenizer's).
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids=()):
        llg = _llguidance()
        eos = sorted(eos_token_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        if not eos:
            raise StructuredOutputsError("structured outputs need an EOS token (the engine's or the tokenizer's)")
        self.llg, self.vocab_size, self.eos = llg, vocab_size, eos
        self.tokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                         eos_token=eos if len(eos) > 1 else eos[0])
        self._compiled: dict[str, object] = {}  # key -> a fresh matcher (deep-copied per branch)
        self._matchers: dict[int, list] = {}  # id(branch) -> [branch, matcher, tokens consumed]
        self._executor = None

    def check(self, params: StructuredOutputsParams) -> None:
        """Compile (once per key); raises StructuredOutputsError with llguidance's first error line."""
        key = params.key()
        if key in self._compiled:
            return
        text = grammar_text(params)
        error = self.llg.LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise StructuredOutputsError(f"structured_outputs.{params.kind} does not compile: {_line(error)}")
        matcher = self.llg.LLMatcher(self.tokenizer, text)
        if matcher.is_error():
            raise StructuredOutputsError(f"structured_outputs.{params.kind} does not compile: "
                                         f"{_line(matcher.get_error())}")
        self._compiled[key] = matcher

    def fill(self, rows: list, bitmask: np.ndarray) -> None:
        """``rows[k] = (request, branch)``: bitmask row k (int32 [k, W] view) from that branch's matcher after its
        known outputs (all of them: the engine retires a structured request's step before the next)."""
        items = []
        for k, (request, branch) in enumerate(rows):
            matcher = self._matcher(request, branch)
            if matcher.is_error():
                bitmask[k] = 0
                for e in self.eos:
                    bitmask[k, e >> 5] |= np.int32(np.uint32(1 << (e & 31)).view(np.int32))
            else:
                items.append((matcher, k))
        if len(items) > 1:
            if self._executor is None:
                self._executor = self.llg.LLExecutor()
            self.llg.numpy.fill_next_token_bitmask_par(self._executor, items, bitmask)
        elif items:
            self.llg.numpy.fill_next_token_bitmask(items[0][0], bitmask, items[0][1])

    def _matcher(self, request, branch):
        entry = self._matchers.get(id(branch))
        if entry is None or entry[0] is not branch:
            self.check(request.params.structured_outputs)
            entry = [branch, self._compiled[request.params.structured_outputs.key()].deep_copy(), 0]
            self._matchers[id(branch)] = entry
        _, matcher, done = entry
        known = branch.num_known_outputs()
        for token in branch.output_token_ids[done:known]:
            if not matcher.is_error():
                matcher.consume_token(token)  # NOTE: a refused token (ignored masks) puts it in error: EOS only
        entry[2] = known
        return matcher

    def release(self) -> None:
        """Forget the matchers of finished (or aborted) branches."""
        for key in [k for k, (b, _, _) in self._matchers.items() if b.finished]:
            del self._matchers[key]
