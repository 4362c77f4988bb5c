"""Issue 21, offline findings: each test is written from the finding's description (and failed on the code
before the fix): stop strings of bounded cost, streams that always end, one thread model, caller mistakes as
ValueError, loader caps, the safetensors writer's reserved name, bools as token ids, a KV budget beyond memory."""
import gc
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from test_text_support import hf_tensors, write_checkpoint  # noqa: E402

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from pagedkv.llm import LLM  # noqa: E402

ENGINE = dict(device="cpu", num_blocks=64, block_size=16, max_model_len=256)
# a Qwen2.5-style template: an assistant message's tool_calls are iterated
TOOL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
                 "{% if m.tool_calls %}{% for tc in m.tool_calls %}<tool_call>{{ tc.function.name }}</tool_call>"
                 "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), **ENGINE)


def engine_of(llm):
    return getattr(llm, "llm_engine", None) or llm.engine


def idle(llm) -> bool:
    bm = engine_of(llm).manager.block_manager
    return not engine_of(llm).has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


# -------------------------------------------------------------------------------------- 1. stop strings
def test_too_many_or_too_long_stop_strings_are_refused(llm):
    with pytest.raises(ValueError, match="stop strings.*at most"):
        llm.generate("hi", SamplingParams(max_tokens=4, stop=["x" * 499] * 10_000))
    with pytest.raises(ValueError, match="stop string.*longer than"):
        llm.generate("hi", SamplingParams(max_tokens=4, stop=["y" * 5000]))
    assert idle(llm)


def test_stop_string_limits_are_configurable(checkpoint):
    small = LLM(str(checkpoint), max_stop_strings=2, max_stop_string_len=4, **ENGINE)
    with pytest.raises(ValueError, match="at most 2"):
        small.generate("hi", SamplingParams(max_tokens=4, stop=["a", "b", "c"]))
    with pytest.raises(ValueError, match="longer than 4"):
        small.generate("hi", SamplingParams(max_tokens=4, stop=["abcde"]))
    small.generate("hi", SamplingParams(max_tokens=4, stop=["a", "bcde"]))


def test_stop_string_work_per_character_does_not_grow_with_their_number():
    """The matcher visits O(1) automaton states per character (amortized), whatever the stop strings."""
    from pagedkv.text.stop_matcher import StopMatcher

    few = StopMatcher(["zq" * 200])
    many = StopMatcher([f"{i:05d}" + "zq" * 240 for i in range(1000)])
    text = "the quick brown fox jumps over the lazy dog " * 50
    for m in (few, many):
        state = m.start
        for ch in text:
            state, _ = m.feed(state, ch)
    assert many.num_transitions <= 3 * len(text) and few.num_transitions <= 3 * len(text)


# ------------------------------------------------------------------------------------------- 2. streams
def bounded_steps(engine, limit=5000):
    """Make ``engine.step`` raise after ``limit`` calls (a stream that spins forever fails instead of hanging)."""
    original, calls = engine.step, [0]

    def step():
        calls[0] += 1
        if calls[0] > limit:
            raise RuntimeError("engine.step called without end: a stream spins")
        return original()
    engine.step = step
    return lambda: setattr(engine, "step", original)


def test_two_interleaved_streams_both_finish(llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [llm.generate(p, params)[0].outputs[0].text for p in ("First stream", "Second stream")]
    restore = bounded_steps(engine_of(llm))
    try:
        a, b = llm.stream("First stream", params), llm.stream("Second stream", params)
        got_a = "".join(a)  # read the first to its end: it steps the second's request too
        got_b = "".join(b)
    finally:
        restore()
    assert [got_a, got_b] == want
    assert idle(llm)


def test_a_stream_never_iterated_is_aborted_when_collected(llm):
    stream = llm.stream("Never read", SamplingParams(max_tokens=100, ignore_eos=True))
    assert engine_of(llm).has_unfinished_requests()
    del stream
    gc.collect()
    assert idle(llm)
    llm.beam_search(["After"], beam_width=2, max_tokens=2)  # the engine is idle: beam search is accepted


def test_closing_a_stream_never_iterated_aborts_it(llm):
    stream = llm.stream("Close me", SamplingParams(max_tokens=100, ignore_eos=True))
    stream.close()
    assert idle(llm)


# ------------------------------------------------------------------------------------------- 3. threads
@pytest.fixture
def fast_switching():
    """Switch threads every 10 us instead of 5 ms, so that calls interleave far more often."""
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def test_two_threads_generate_the_single_threaded_answers(llm, fast_switching):
    prompts = [f"Thread prompt {i}" for i in range(5)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = {p: llm.generate(p, params)[0].outputs[0].token_ids for p in prompts}
    got, errors = [], []

    def worker(k):
        try:
            for i in range(100):
                p = prompts[(i + k) % len(prompts)]
                got.append((p, llm.generate(p, params)[0].outputs[0].token_ids))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:1]
    assert len(got) == 200 and all(ids == want[p] for p, ids in got)
    assert idle(llm)


def test_engine_add_request_from_another_thread_while_stepping(fast_switching):
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", num_blocks=64, max_model_len=128, max_num_seqs=8))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = engine.generate([[1, 2, 3]], params, progress=False)[0].outputs[0].token_ids
    errors, added, aborted, done, finals = [], [], set(), threading.Event(), {}

    def adder():
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if len(added) - len(aborted) - len(finals) > 32:
                    time.sleep(1e-4)
                    continue
                added.append(engine.add_request([1, 2, 3], params))
                if len(added) % 3 == 0:
                    aborted.add(added[-2])
                    engine.abort_request(added[-2])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=adder)
    t.start()
    try:
        while not done.is_set() or engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out.outputs[0]
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
    t.join(timeout=60)
    assert not errors, errors[:1]
    assert len(added) > 50
    for rid in added:
        if rid not in aborted:
            assert finals[rid].token_ids == alone
    assert not engine.has_unfinished_requests()


# ------------------------------------------------------------------------------ 7. caller mistakes offline
def test_chat_with_malformed_tool_calls_is_a_value_error(llm):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": 5}]
    with pytest.raises(ValueError, match="message 1"):
        llm.chat(messages, chat_template=TOOL_TEMPLATE)


@pytest.mark.parametrize("where", ["generate", "chat"])
def test_lone_surrogates_are_a_value_error(llm, where):
    with pytest.raises(ValueError, match="surrogate|UTF-8"):
        if where == "generate":
            llm.generate("bad \ud800 text", SamplingParams(max_tokens=2))
        else:
            llm.chat([{"role": "user", "content": "bad \ud800"}], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("key", ["special_tokens", "source", "self", "messages"])
def test_reserved_chat_template_kwargs_are_a_value_error(llm, key):
    with pytest.raises(ValueError, match=key):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2),
                 chat_template_kwargs={key: 1})


def test_deeply_nested_message_is_a_value_error(llm):
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError):
        llm.chat([{"role": "user", "content": "hi", "extra": deep}], chat_template="{{ messages | tojson }}")


def test_a_template_that_never_ends_is_stopped():
    from pagedkv.text.chat_template import render_chat_template

    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ValueError, match="limit"):
        render_chat_template(loop, [{"role": "user", "content": "x"}])
    big = "{% for i in range(100000) %}{{ 'abcdefghij' * 1000 }}{% endfor %}"
    with pytest.raises(ValueError, match="limit"):
        render_chat_template(big, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="limit"):
        render_chat_template("{{ 'x' * 1000000000 }}", [{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------------ 8. loader
def hf_config(**over):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
           "max_position_embeddings": 512, "torch_dtype": "float32"}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**9), ("num_hidden_layers", 2**64),
                                         ("hidden_size", 10**9), ("vocab_size", 10**12),
                                         ("num_attention_heads", 10**7), ("intermediate_size", 10**10),
                                         ("max_position_embeddings", 10**12)])
def test_absurd_config_sizes_are_refused_before_allocation(tmp_path, field, value):
    from pagedkv.model.checkpoint import load_checkpoint

    (tmp_path / "config.json").write_text(json.dumps(hf_config(**{field: value})))
    with pytest.raises(ValueError, match=field):
        load_checkpoint(tmp_path, device="cpu")


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    from pagedkv.model import get_config, random_weights
    from pagedkv.model.checkpoint import load_checkpoint
    from pagedkv.model.safetensors import save_file

    config = get_config("tiny", vocab_size=512, max_position_embeddings=512)
    tensors = hf_tensors(config, random_weights(config, seed=0, dtype="float32", device="cpu"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tie_word_embeddings=False)))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight.*(NaN|non-finite)"):
        load_checkpoint(tmp_path, device="cpu")
    load_checkpoint(tmp_path, device="cpu", allow_non_finite=True)


# ------------------------------------------------------------------------------------ 9. safetensors
def test_safetensors_writer_refuses_the_reserved_name(tmp_path):
    from pagedkv.model.safetensors import save_file

    with pytest.raises(ValueError, match="__metadata__"):
        save_file({"__metadata__": np.zeros(2, np.float32)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------ 11. smaller
@pytest.mark.parametrize("prompt", [[True, False], [1, True], [np.bool_(True), 2]])
def test_bools_are_not_token_ids(llm, prompt):
    with pytest.raises(ValueError, match="bool"):
        engine_of(llm).add_request(prompt, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="bool"):
        llm.generate([prompt], SamplingParams(max_tokens=2))
    assert idle(llm)


def test_kv_memory_beyond_the_host_is_a_value_error():
    with pytest.raises(ValueError, match=str(10**15)):
        LLMEngine(EngineConfig(model="tiny", device="cpu", kv_memory_bytes=10**15))
