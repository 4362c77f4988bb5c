"""LLM: text in, text out over :class:`~pagedkv.engine.LLMEngine`, with vLLM's offline surface.

::

    llm = LLM("path/to/hf-checkpoint", dtype="auto", max_model_len=4096)     # or a preset: LLM("small")
    outs = llm.generate(["Hello, my name is", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].logprobs            # list[dict[int, Logprob]] with logprobs=k
    llm.chat([{"role": "user", "content": "Hi!"}], chat_template_kwargs={"enable_thinking": False})
    llm.beam_search(["The best"], BeamSearchParams(beam_width=4, max_tokens=16))
    for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=64)):
        print(delta, end="", flush=True)

A preset name (``"small"``, ``"tiny"``, ``"llama-1b"``) builds random weights; ``"small"`` ships a tokenizer
(text works at once), the others take token ids unless one is given (``tokenizer="folder/with/tokenizer.json"``).

Threads: one engine, one caller at a time. Every call that touches the engine holds its lock (``generate``,
``chat`` and ``beam_search`` for their whole run, a stream for each step), so calls from several threads are
served one after another and always get the single-threaded answer.
"""
from __future__ import annotations

from pathlib import Path

from .engine import EngineConfig, LLMEngine, RequestOutput
from .beam.search import BeamSearchOutput, BeamSearchParams, beam_search
from .llm_inputs import config_field_names, engine_options, is_token_ids, parse_prompts, per_prompt
from .llm_stream import Mailboxes, Stream
from .logprob import Logprob
from .sampling_params import SamplingParams


class LLM:
    """A model, its tokenizer and an engine.

    Args:
        model: a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``, and ``tokenizer.json``
            for text) or a preset name (random weights).
        tokenizer: a :class:`pagedkv.text.Tokenizer` or a folder holding ``tokenizer.json``; default: the
            checkpoint folder's (or the preset's), if it has one.
        options: vLLM's names (``dtype="auto"``, ``gpu_memory_utilization``, ``enforce_eager``,
            ``kv_cache_dtype``, ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``,
            ``enable_prefix_caching``, ``enable_chunked_prefill``, ``seed``, ``tensor_parallel_size``,
            ``trust_remote_code``) and :class:`~pagedkv.engine.EngineConfig` fields (``device``, ``num_blocks``,
            ...). See :mod:`pagedkv.llm_inputs`; a value pagedkv cannot honour raises ``ValueError``.
    """

    def __init__(self, model: str | Path, *, tokenizer=None, **options):
        from .backend import get_backend

        folder = Path(model) if isinstance(model, (str, Path)) else None
        is_checkpoint = folder is not None and (folder / "config.json").is_file()
        if not is_checkpoint and (not isinstance(model, str) or model not in _presets()):
            raise ValueError(f"model must be a checkpoint folder (with config.json) or a preset {_presets()}, "
                             f"got {model!r}")
        on_gpu = get_backend(options.get("device", "auto")).is_gpu
        engine_kwargs = engine_options(options, config_field_names(EngineConfig), on_gpu)
        engine_kwargs.setdefault("host_matmul", "float32")  # NOTE: fast CPU products (the engine keeps float64)
        self.tokenizer = _load_tokenizer(tokenizer, folder if is_checkpoint else None,
                                         None if is_checkpoint else model)
        self.model_name = str(model)
        if is_checkpoint:  # dtype, EOS ids and sampling defaults: the checkpoint's (generation_config.json)
            self.engine = LLMEngine.from_checkpoint(folder, EngineConfig(**engine_kwargs), tokenizer=self.tokenizer)
            _check_vocab(self.tokenizer, self.engine.model_config.vocab_size)
        else:
            _check_vocab(self.tokenizer, _preset_vocab(model))  # before building random weights
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                engine_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), tokenizer=self.tokenizer)
        self.default_sampling_params = self.engine.default_params
        self._mailboxes = Mailboxes()
        self._next_id = 0

    # ----------------------------------------------------------------------------------- vLLM's accessors
    @property
    def llm_engine(self) -> LLMEngine:
        return self.engine

    def get_tokenizer(self):
        """The :class:`pagedkv.text.Tokenizer` (``encode`` / ``decode`` / ``apply_chat_template``), or None."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation defaults (``generation_config.json``) as SamplingParams."""
        return self.default_sampling_params

    def encode(self, *args, **kwargs):
        """Refused: in vLLM, ``LLM.encode`` is the pooling (embedding) API, which pagedkv does not implement."""
        raise ValueError("LLM.encode is vLLM's pooling API, which pagedkv does not implement; to tokenize, use "
                         "llm.get_tokenizer().encode(text)")

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete ``prompts`` (strings, token-id lists, TextPrompt/TokensPrompt dicts, or a list of them) with
        one SamplingParams or one per prompt; outputs in order. Everything is checked before anything is queued."""
        parsed = parse_prompts(prompts)
        ids = [p.token_ids if p.token_ids is not None else self._encode(p.text) for p in parsed]
        return self._generate(ids, [p.text for p in parsed], sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             use_tqdm: bool = True, chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools=None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or a list of conversations.

        Content is a string or OpenAI parts (``[{"type": "text", "text": ...}]``, joined with newlines as vLLM's
        "string" format does; ``chat_template_content_format="openai"`` hands the parts to the template);
        non-text parts are refused. ``chat_template``: jinja2 source or a template name; ``chat_template_kwargs``:
        template variables (``enable_thinking``...); ``continue_final_message``: the model continues the last
        (assistant) message instead of starting a new one.
        """
        from .text.chat_messages import conversations_of, render_conversation

        tok = self._require_tokenizer("chat")
        texts = [render_conversation(tok, c, chat_template=chat_template, content_format=chat_template_content_format,
                                     add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message, tools=tools,
                                     chat_template_kwargs=chat_template_kwargs)
                 for c in conversations_of(messages)]
        ids = [tok.encode(text, add_special_tokens=False) for text in texts]  # the template wrote them
        return self._generate(ids, texts, sampling_params, use_tqdm)

    def _generate(self, ids, texts, sampling_params, use_tqdm) -> list[RequestOutput]:
        if not isinstance(use_tqdm, bool):
            raise ValueError(f"use_tqdm must be a bool, got {use_tqdm!r}")
        params = per_prompt(sampling_params, len(ids), self.default_sampling_params)
        outputs = self.engine.generate(ids, params, progress=use_tqdm)
        for out, text in zip(outputs, texts):
            self._finish_output(out, text)
        return outputs

    def _finish_output(self, out: RequestOutput, text: str | None) -> RequestOutput:
        """vLLM's shapes: a str request id, Logprob entries with their decoded token."""
        out.prompt = text
        out.request_id = str(self._new_id())
        decode = self.tokenizer.token_text if self.tokenizer is not None else None
        for c in out.outputs:
            if c.logprobs is not None:
                c.logprobs = [_logprob_dict(e, decode) for e in c.logprobs]
        if out.prompt_logprobs is not None:
            out.prompt_logprobs = [None if e is None else _logprob_dict(e, decode) for e in out.prompt_logprobs]
        return out

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _encode(self, text: str) -> list[int]:
        return self._require_tokenizer("a text prompt").encode(text)

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and model {self.model_name!r} has none: pass token ids, or "
                             f"LLM(..., tokenizer=DIR) with a folder holding tokenizer.json")
        return self.tokenizer

    # -------------------------------------------------------------------------------------------- stream
    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Stream:
        """Text deltas of one prompt's completion as tokens arrive: ``str`` for ``n == 1``, ``(index, str)`` for
        ``n > 1``. Closing it (``break``, ``close()``) or dropping it aborts the request (see
        :mod:`pagedkv.llm_stream`)."""
        parsed = parse_prompts(prompt)
        if len(parsed) != 1 or not (isinstance(prompt, (str, dict)) or is_token_ids(prompt)):
            raise ValueError(f"stream() takes one prompt, got {prompt!r:.80}")
        parsed = parsed[0]
        params = self.default_sampling_params if sampling_params is None else sampling_params
        self._require_tokenizer("stream()")
        ids = parsed.token_ids if parsed.token_ids is not None else self._encode(parsed.text)
        request_id = f"stream-{self._new_id()}"
        self.engine.add_request(ids, params, request_id=request_id, prompt=parsed.text)
        return Stream(self.engine, self._mailboxes, request_id, params.n)

    # --------------------------------------------------------------------------------------- beam search
    def beam_search(self, prompts, params: BeamSearchParams | int | None = None, max_tokens: int | None = None,
                    length_penalty: float = 1.0, *, beam_width: int | None = None, ignore_eos: bool = False,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search of each prompt with vLLM's rules; beams share every common KV block (``fork_sequence``).

        ``params``: vLLM's :class:`BeamSearchParams` (or ``beam_width=``, ``max_tokens=`` keywords). Returns
        ``BeamSearchOutput``s whose ``sequences`` are best first, each with ``tokens`` (prompt + generated),
        ``logprobs``, ``cum_logprob`` and ``text`` (the generated text, an ending EOS not decoded).
        """
        if isinstance(params, BeamSearchParams):
            if beam_width is not None or max_tokens is not None:
                raise ValueError("give a BeamSearchParams or beam_width/max_tokens, not both")
        else:
            width = params if params is not None else beam_width
            if width is None or max_tokens is None:
                raise ValueError("beam_search needs a BeamSearchParams (or beam_width= and max_tokens=)")
            params = BeamSearchParams(width, max_tokens, ignore_eos, length_penalty)
        parsed = parse_prompts(prompts)
        ids = [p.token_ids if p.token_ids is not None else self._encode(p.text) for p in parsed]
        with self.engine.serial.lock:
            outputs = beam_search(self.engine, ids, params.beam_width, params.max_tokens, params.length_penalty,
                                  ignore_eos=params.ignore_eos, eos_token_ids=params.eos_token_ids)
        for out, p in zip(outputs, parsed):
            out.prompt = p.text
            for s in out.sequences:
                self._finish_sequence(s, out.prompt_token_ids)
        return outputs

    def _finish_sequence(self, s, prompt_ids: list[int]) -> None:
        """vLLM's BeamSearchSequence fields: ``tokens`` prompt + generated, ``logprobs`` one ``{token: Logprob}``
        per generated token, ``text`` the generated text (an ending EOS not decoded)."""
        decode = self.tokenizer.token_text if self.tokenizer is not None else None
        s.tokens = list(prompt_ids) + list(s.token_ids)
        s.logprobs = [_logprob_dict({t: lp}, decode) for t, lp in zip(s.token_ids, s.logprobs)]
        if self.tokenizer is not None:
            ids = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
            s.text = self.tokenizer.decode(ids)


def _logprob_dict(entries: dict, decode) -> dict[int, Logprob]:
    out = {}
    for token, value in entries.items():
        lp = value if isinstance(value, Logprob) else Logprob(float(value))
        if lp.decoded_token is None and decode is not None:
            lp.decoded_token = decode(token)
        out[token] = lp
    return out


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


def _load_tokenizer(tokenizer, folder: Path | None, preset: str | None):
    from .text import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return Tokenizer.from_folder(tokenizer)
    if folder is not None and (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    if preset is not None:
        from .text.presets import preset_tokenizer

        return preset_tokenizer(preset)
    return None
