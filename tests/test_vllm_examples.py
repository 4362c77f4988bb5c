"""vLLM's offline examples, written as its documentation writes them, run against pagedkv on the CPU.

Only the import line and the model name differ from vLLM's pages (``from pagedkv import ...``, ``"small"``: a
random-weight preset with a tokenizer, so the text is noise but every field has vLLM's shape). Tests of
SamplingParams fields that pagedkv adds in another change (penalties, structured output) skip until the field
exists, and then run unchanged.
"""
import dataclasses
import json

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from pagedkv import LLM, BeamSearchParams, SamplingParams, TextPrompt, TokensPrompt  # noqa: E402

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(model="small", device="cpu", max_model_len=512, seed=0)


def has_field(name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(SamplingParams)}


# --------------------------------------------------------------------------------------- basic.py
def test_basic_generate(llm):
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    outputs = llm.generate(prompts, sampling_params)
    for prompt, output in zip(prompts, outputs):
        assert output.prompt == prompt
        generated_text = output.outputs[0].text
        assert isinstance(generated_text, str) and isinstance(output.request_id, str)
        assert output.finished and output.prompt_token_ids == llm.get_tokenizer().encode(prompt)
        c = output.outputs[0]
        assert (c.index, c.finish_reason) == (0, "length") or c.finish_reason == "stop"
        assert len(c.token_ids) <= sampling_params.max_tokens and c.stop_reason is None or c.finish_reason == "stop"
    assert len({o.request_id for o in outputs}) == len(outputs)


def test_generate_with_use_tqdm_and_params_per_prompt(llm):
    params = [SamplingParams(temperature=0, max_tokens=4 + i) for i in range(len(prompts))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 5, 6, 7]


# ----------------------------------------------------------------------------------- prompt dicts
def test_prompt_dicts(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=8)
    text = llm.generate(TextPrompt(prompt="The capital of France is"), params)[0]
    ids = llm.generate(TokensPrompt(prompt_token_ids=tok.encode("The capital of France is")), params)[0]
    mixed = llm.generate([{"prompt": "The capital of France is"},
                          {"prompt_token_ids": tok.encode("The capital of France is")}], params)
    assert text.outputs[0].token_ids == ids.outputs[0].token_ids == [o.outputs[0].token_ids for o in mixed][1]
    assert text.prompt == "The capital of France is" and ids.prompt is None


# --------------------------------------------------------------------------------------------- chat
def test_chat(llm):
    sampling_params = SamplingParams(temperature=0.5, max_tokens=16)
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(conversation, sampling_params=sampling_params, use_tqdm=False)
    assert outputs[0].prompt.endswith("<|im_start|>assistant\n") and outputs[0].outputs[0].finish_reason

    conversations = [conversation for _ in range(4)]
    outputs = llm.chat(conversations, sampling_params=sampling_params, use_tqdm=True)
    assert len(outputs) == 4


def test_chat_template_and_its_options(llm):
    chat_template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant]{% endif %}{% if suffix %}{{ suffix }}{% endif %}")
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                    {"role": "assistant", "content": "Sure, the answer"}]
    out = llm.chat(conversation, SamplingParams(max_tokens=2), chat_template=chat_template,
                   add_generation_prompt=False, continue_final_message=True, use_tqdm=False)[0]
    assert out.prompt == "[user] Hi\nthere\n[assistant] Sure, the answer"
    out = llm.chat(conversation[:1], SamplingParams(max_tokens=2), chat_template=chat_template,
                   chat_template_kwargs={"suffix": "!"}, use_tqdm=False)[0]
    assert out.prompt == "[user] Hi\nthere\n[assistant]!"
    with pytest.raises(ValueError, match="image_url.*text parts only"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(conversation, continue_final_message=True)


# ---------------------------------------------------------------------------------------- logprobs
def test_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, prompt_logprobs=3)
    out = llm.generate("The capital of France is", params)[0]
    tok = llm.get_tokenizer()
    for token_id, logprobs in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        lp = logprobs[token_id]
        assert lp.rank == 1 and lp.decoded_token == tok.decode([token_id], skip_special_tokens=False)
        assert lp.logprob <= 0 and len(logprobs) == 5
        assert sorted(v.rank for v in logprobs.values()) == [1, 2, 3, 4, 5]
    assert abs(out.outputs[0].cumulative_logprob - sum(lps[t].logprob for t, lps in
                                                       zip(out.outputs[0].token_ids, out.outputs[0].logprobs))) < 1e-3
    assert out.prompt_logprobs[0] is None
    for token_id, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert logprobs[token_id].rank >= 1 and logprobs[token_id].decoded_token is not None


# ------------------------------------------------------------------------------------- beam search
def test_beam_search(llm):
    params = BeamSearchParams(beam_width=4, max_tokens=8)
    outputs = llm.beam_search([{"prompt": "The future of AI is"}, "Hello, my name is"], params)
    tok = llm.get_tokenizer()
    for output, prompt in zip(outputs, ["The future of AI is", "Hello, my name is"]):
        assert 1 <= len(output.sequences) <= 4
        best = output.sequences[0]
        prompt_ids = tok.encode(prompt)
        assert best.tokens[:len(prompt_ids)] == prompt_ids and len(best.tokens) == len(prompt_ids) + 8
        assert best.text == tok.decode(best.tokens[len(prompt_ids):])
        assert abs(best.cum_logprob - sum(lp[t].logprob for t, lp in
                                          zip(best.tokens[len(prompt_ids):], best.logprobs))) < 1e-4
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)


# ------------------------------------------------------------------------------------------ options
def test_llm_options_of_vllm():
    llm = LLM("small", dtype="auto", gpu_memory_utilization=0.9, enforce_eager=True, kv_cache_dtype="auto",
              max_model_len=256, max_num_seqs=16, max_num_batched_tokens=512, enable_prefix_caching=True,
              enable_chunked_prefill=True, seed=0, tensor_parallel_size=1, trust_remote_code=False, device="cpu")
    assert llm.llm_engine.max_model_len == 256 and llm.llm_engine.config.max_num_seqs == 16
    with pytest.raises(ValueError, match="swap_space"):
        LLM("small", swap_space=4, device="cpu")
    with pytest.raises(ValueError, match="tokenize, use llm.get_tokenizer"):
        llm.encode("Hello")


# --------------------------------------------------------------------- fields added by the sampling change
@pytest.mark.skipif(not has_field("repetition_penalty"), reason="SamplingParams has no penalties yet")
def test_penalties(llm):
    params = SamplingParams(temperature=0, max_tokens=24, presence_penalty=1.5, frequency_penalty=1.0,
                            repetition_penalty=1.3)
    plain = llm.generate("The future of AI is", SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    out = llm.generate("The future of AI is", params)[0].outputs[0]
    assert len(out.token_ids) == 24
    assert len(set(out.token_ids)) >= len(set(plain.token_ids))


@pytest.mark.skipif(not has_field("structured_outputs") and not has_field("guided_decoding"),
                    reason="SamplingParams has no structured output yet")
def test_structured_output_choice_and_json(llm):
    import pagedkv.sampling_params as sp

    name = "structured_outputs" if has_field("structured_outputs") else "guided_decoding"
    Params = getattr(sp, "StructuredOutputsParams", None) or getattr(sp, "GuidedDecodingParams")
    params = SamplingParams(max_tokens=32, **{name: Params(choice=["Positive", "Negative"])})
    out = llm.generate("Classify this sentiment: vLLM is wonderful!", params)[0]
    assert out.outputs[0].text in ("Positive", "Negative")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"],
              "additionalProperties": False}
    params = SamplingParams(max_tokens=200, seed=0, **{name: Params(json=schema, disable_any_whitespace=True)})
    out = llm.generate("Give me a JSON object with a name:", params)[0]
    assert "name" in json.loads(out.outputs[0].text)
