"""LLM: text in, text out over :class:`~pagedkv.engine.LLMEngine`, with vLLM's shape.

::

    llm = LLM("path/to/hf-checkpoint")                       # weights, tokenizer, chat template, EOS, defaults
    llm.generate(["Hello, my name is"], SamplingParams(max_tokens=32))[0].outputs[0].text
    llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text
    for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=64)):
        print(delta, end="", flush=True)

A preset name (``"tiny"``, ``"llama-1b"``) builds random weights and has no tokenizer unless one is given
(``tokenizer="folder/with/tokenizer.json"``): token-id prompts work, text prompts are refused.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and \
        all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def _as_prompt_list(prompts) -> list:
    """One prompt (a string or a list of ids) or a list of them, as a list of prompts."""
    if isinstance(prompts, str) or _is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts:
        return list(prompts)
    raise ValueError(f"prompts must be a string, a list of token ids, or a non-empty list of those; "
                     f"got {prompts!r:.80}")


def _is_conversation(messages) -> bool:
    return isinstance(messages, (list, tuple)) and len(messages) > 0 and all(isinstance(m, dict) for m in messages)


class LLM:
    """A model, its tokenizer and an engine.

    Args:
        model: a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``, and ``tokenizer.json``
            for text) or a preset name (random weights).
        tokenizer: a :class:`pagedkv.text.Tokenizer` or a folder holding ``tokenizer.json``; default: the
            checkpoint folder's, if it has one.
        engine_options: :class:`~pagedkv.engine.EngineConfig` fields (``dtype``, ``device``, ``num_blocks``,
            ``max_model_len``, ``max_num_seqs``, ...).
    """

    def __init__(self, model: str | Path, *, tokenizer=None, **engine_options):
        folder = Path(model) if isinstance(model, (str, Path)) else None
        is_checkpoint = folder is not None and (folder / "config.json").is_file()
        if not is_checkpoint and (not isinstance(model, str) or model not in _presets()):
            raise ValueError(f"model must be a checkpoint folder (with config.json) or a preset {_presets()}, "
                             f"got {model!r}")
        self.tokenizer = _load_tokenizer(tokenizer, folder if is_checkpoint else None)
        self.model_name = str(model)
        if is_checkpoint:  # dtype, EOS ids and sampling defaults: the checkpoint's (generation_config.json)
            self.engine = LLMEngine.from_checkpoint(folder, EngineConfig(**engine_options), tokenizer=self.tokenizer)
            _check_vocab(self.tokenizer, self.engine.model_config.vocab_size)
        else:
            _check_vocab(self.tokenizer, _preset_vocab(model))  # before building random weights
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                engine_options.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            self.engine = LLMEngine(EngineConfig(model=model, **engine_options), tokenizer=self.tokenizer)
        self.default_sampling_params = self.engine.default_params

    # ------------------------------------------------------------------------------------------ prompts
    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and model {self.model_name!r} has none: pass token ids, or "
                             f"LLM(..., tokenizer=DIR) with a folder holding tokenizer.json")
        return self.tokenizer

    def encode(self, prompt) -> list[int]:
        """Token ids of a prompt given as text (special tokens added as the tokenizer says) or as ids."""
        if isinstance(prompt, str):
            return self._require_tokenizer("a text prompt").encode(prompt)
        if _is_token_ids(prompt):
            return [int(t) for t in prompt]
        raise ValueError(f"a prompt must be a string or a non-empty list of token ids, got {prompt!r:.80}")

    def chat_prompt(self, messages, *, chat_template: str | None = None, add_generation_prompt: bool = True,
                    **template_kwargs) -> list[int]:
        """Token ids of one conversation rendered by the chat template (the template writes special tokens)."""
        tok = self._require_tokenizer("chat")
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                       chat_template=chat_template, tokenize=True, **template_kwargs)

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Complete ``prompts`` (strings or token-id lists); outputs in order, with text and token ids.

        Every prompt is encoded and validated before any request is queued.
        """
        prompts = _as_prompt_list(prompts)
        ids = [self.encode(p) for p in prompts]
        return self._generate(ids, prompts, sampling_params, progress)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True, progress: bool = False,
             **template_kwargs) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or a list of conversations."""
        conversations = [messages] if _is_conversation(messages) else messages
        if not isinstance(conversations, (list, tuple)) or not conversations or \
                not all(_is_conversation(c) for c in conversations):
            raise ValueError("messages must be a conversation (a list of {'role', 'content'} dicts) or a list of them")
        tok = self._require_tokenizer("chat")
        texts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                                         **template_kwargs) for c in conversations]
        ids = [tok.encode(text, add_special_tokens=False) for text in texts]  # the template wrote them
        return self._generate(ids, texts, sampling_params, progress)

    def _generate(self, ids, texts, sampling_params, progress) -> list[RequestOutput]:
        params = self.default_sampling_params if sampling_params is None else sampling_params
        outputs = self.engine.generate(ids, params, progress=progress)
        for out, text in zip(outputs, texts):
            out.prompt = text if isinstance(text, str) else None
        return outputs

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt's completion as tokens arrive (``n`` must be 1).

        Closing the iterator early (``break``) aborts the request and frees its blocks.
        """
        params = self.default_sampling_params if sampling_params is None else sampling_params
        if params.n != 1:
            raise ValueError(f"stream() streams one completion: n must be 1, got {params.n}")
        ids = self.encode(prompt)
        self._require_tokenizer("stream()")
        request_id = self.engine.add_request(ids, params, prompt=prompt if isinstance(prompt, str) else None)
        return self._stream(request_id)

    def _stream(self, request_id) -> Iterator[str]:
        sent, finished = 0, False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        text, finished = out.outputs[0].text, out.finished
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
        finally:
            if not finished:
                self.engine.abort_request(request_id)

    def beam_search(self, prompts, beam_width: int, max_tokens: int, length_penalty: float = 1.0, *,
                    ignore_eos: bool = False) -> list:
        """Beam search of each prompt (strings or token-id lists) with vLLM's rules; beams share every common
        KV block (``fork_sequence``). Returns ``BeamSearchOutput``s: ``sequences`` best first, with text."""
        from .beam.search import beam_search_text

        return beam_search_text(self, prompts, beam_width, max_tokens, length_penalty, ignore_eos=ignore_eos)

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation defaults (``generation_config.json``) as SamplingParams."""
        return self.default_sampling_params


def _presets() -> list[str]:
    from .model.config import PRESETS

    return sorted(PRESETS)


def _preset_vocab(name: str) -> int:
    from .model.config import PRESETS

    return PRESETS[name].vocab_size


def _check_vocab(tokenizer, vocab_size: int) -> None:
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {vocab_size}: "
                         f"they do not belong together")


def _load_tokenizer(tokenizer, folder: Path | None):
    from .text import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return Tokenizer.from_folder(tokenizer)
    if folder is not None and (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    return None
