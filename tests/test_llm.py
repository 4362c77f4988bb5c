"""LLM: text in, text out on a tiny random checkpoint with a tokenizer trained on the spot."""
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from test_text_support import write_checkpoint  # noqa: E402

from pagedkv.engine import SamplingParams  # noqa: E402
from pagedkv.llm import LLM  # noqa: E402
from pagedkv.text.train import train_tokenizer  # noqa: E402

ENGINE = dict(device="cpu", num_blocks=64, block_size=16, max_model_len=256)
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a KV block?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), generation={"temperature": 0.0, "max_new_tokens": 9})


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), **ENGINE)


def pool_free(llm) -> bool:
    bm = llm.engine.manager.block_manager
    return not llm.engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


def test_generate_on_text_equals_generate_on_its_token_ids(llm):
    params = SamplingParams(max_tokens=16, seed=4)
    prompts = ["Paged attention stores", "Café — 中文 😀"]
    by_text = llm.generate(prompts, params)
    by_ids = llm.generate([llm.tokenizer.encode(p) for p in prompts], params)
    for t, i, prompt in zip(by_text, by_ids, prompts):
        assert t.outputs[0].token_ids == i.outputs[0].token_ids
        assert t.outputs[0].text == i.outputs[0].text == llm.tokenizer.decode(t.outputs[0].token_ids)
        assert t.prompt == prompt and i.prompt is None
    assert pool_free(llm)


def test_defaults_come_from_the_generation_config(llm):
    pytest.importorskip("pagedkv.model.generation_config")  # the loader's reader (the engine falls back without)
    assert llm.get_default_sampling_params().temperature == 0.0
    assert llm.get_default_sampling_params().max_tokens == 9
    out = llm.generate("Greedy by default")[0].outputs[0]
    assert len(out.token_ids) == 9 or out.finish_reason == "stop"
    assert out.token_ids == llm.generate("Greedy by default")[0].outputs[0].token_ids


def test_chat_renders_the_template(llm):
    out = llm.chat(CHAT, SamplingParams(max_tokens=8, seed=1))[0]
    assert out.prompt_token_ids == llm.tokenizer.apply_chat_template(CHAT, tokenize=True)
    assert out.prompt == llm.tokenizer.apply_chat_template(CHAT) and out.prompt.endswith("<|im_start|>assistant\n")
    both = llm.chat([CHAT, CHAT[1:]], SamplingParams(max_tokens=8, seed=1))
    assert [o.outputs[0].text for o in both][0] == out.outputs[0].text and len(both) == 2


def test_stream_deltas_concatenate_to_the_text(llm):
    params = SamplingParams(max_tokens=24, seed=9, ignore_eos=True)
    deltas = list(llm.stream("Streaming text", params))
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == llm.generate("Streaming text", params)[0].outputs[0].text
    assert pool_free(llm)


def test_closing_a_stream_early_aborts_the_request(llm):
    stream = llm.stream("Stop early", SamplingParams(max_tokens=200, ignore_eos=True))
    next(stream)
    assert not pool_free(llm)
    stream.close()
    assert pool_free(llm)


def test_stop_strings_end_generation_early(llm):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full = llm.generate("Stop strings", params)[0].outputs[0]
    stop = full.text[10:12]
    out = llm.generate("Stop strings", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
    cut = out[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert len(cut.token_ids) < len(full.token_ids)  # the engine stopped, not only the text was cut


def test_preset_without_tokenizer_refuses_text_and_takes_ids():
    llm = LLM("tiny", **ENGINE)
    with pytest.raises(ValueError, match="needs a tokenizer.*tokenizer=DIR"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        llm.chat(CHAT)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    train_tokenizer(tmp_path, 300)  # the tiny preset has 256 ids: ids 256..299 could never be fed to it
    with pytest.raises(ValueError, match="tokenizer has 300 ids but the model's vocabulary has 256"):
        LLM("tiny", tokenizer=str(tmp_path), **ENGINE)


def test_bad_model_arguments(tmp_path):
    with pytest.raises(ValueError, match="checkpoint folder .* or a preset"):
        LLM(str(tmp_path), **ENGINE)
    with pytest.raises(ValueError, match="checkpoint folder .* or a preset"):
        LLM("no-such-preset", **ENGINE)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        LLM("tiny", **ENGINE).stream([1, 2], SamplingParams(n=2))


def test_stream_with_n_branches_yields_each_branch_deltas(llm):
    params = SamplingParams(n=3, max_tokens=12, seed=5, ignore_eos=True, temperature=1.0)
    texts = ["", "", ""]
    for index, delta in llm.stream("Three branches", params):
        assert delta
        texts[index] += delta
    want = llm.generate("Three branches", params)[0].outputs
    assert texts == [c.text for c in want]
    assert pool_free(llm)
