"""Structured outputs (issue 19): JSON schema, regex, choice, json_object and Lark grammars through llguidance,
masks applied by the logits processing of the sampler; seeded samples of a random model all parse and validate;
grammars that do not compile are refused before anything is queued."""
import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")

from pagedkv.engine import EngineConfig, LLMEngine  # noqa: E402
from pagedkv.sampling_params import SamplingParams  # noqa: E402
from pagedkv.structured_params import StructuredOutputsError, StructuredOutputsParams  # noqa: E402
from pagedkv.model import get_config  # noqa: E402

VOCAB = 512
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 5},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "fox"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 2},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "pet", "ok"], "additionalProperties": False}


def validate(value, schema=SCHEMA) -> None:
    """The subset of JSON Schema that SCHEMA uses (raises AssertionError)."""
    if "enum" in schema:
        assert value in schema["enum"]
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict) and set(schema["required"]) <= set(value) <= set(schema["properties"])
        for key, item in value.items():
            validate(item, schema["properties"][key])
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema["maxItems"]
        for item in value:
            validate(item, schema["items"])
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema["maxLength"]
    elif kind == "integer":
        assert type(value) is int and schema["minimum"] <= value <= schema["maximum"]
    elif kind == "boolean":
        assert isinstance(value, bool)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from pagedkv.text.train import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB)


def _engine(tokenizer, **kwargs):
    config = EngineConfig(**{"model": get_config("tiny", vocab_size=VOCAB), "device": "cpu", "block_size": 16,
                             "num_blocks": 2048, "seed": 0, "max_num_seqs": 64, "max_num_batched_tokens": 512,
                             "eos_token_id": tokenizer.eos_token_id, **kwargs})
    return LLMEngine(config, tokenizer=tokenizer)


@pytest.mark.parametrize("asynchronous, num", [(False, 200), (True, 40)])
def test_200_seeded_samples_all_parse_and_validate(tokenizer, asynchronous, num):
    eng = _engine(tokenizer, async_scheduling=asynchronous, max_num_seqs=256, max_num_batched_tokens=4096)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=200, structured_outputs=so) for i in range(num)]
    prompt = tokenizer.encode("Pet:")
    outs = eng.generate([prompt] * num, params, progress=False)
    texts = [o.outputs[0].text for o in outs]
    for o, text in zip(outs, texts):
        assert o.outputs[0].finish_reason == "stop", text
        validate(json.loads(text))
    assert len(set(texts)) > num // 2  # seeded draws differ


def test_regex_choice_json_object_and_grammar(tokenizer):
    eng = _engine(tokenizer)
    prompt = tokenizer.encode("Answer:")
    cases = [({"regex": r"[A-Z][a-z]{2,5} [0-9]{2}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{2}", t)),
             ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
             ({"json_object": True, "disable_any_whitespace": True}, lambda t: isinstance(json.loads(t), dict)),
             ({"grammar": 'start: "(" num ("+" num)* ")"\nnum: /[0-9]/'},
              lambda t: re.fullmatch(r"\([0-9](\+[0-9])*\)", t))]
    close = {tokenizer.encode(c, add_special_tokens=False)[0]: 6.0 for c in ('"', "}", "]")}
    for so, check in cases:
        bias = close if "json_object" in so else None  # NOTE: a random model's free strings end only when pushed
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300, structured_outputs=so, logit_bias=bias)
                  for s in range(12)]
        for out in eng.generate([prompt] * 12, params, progress=False):
            assert check(out.outputs[0].text), (so, out.outputs[0].text)


def test_grammar_with_penalties_and_n_branches(tokenizer):
    eng = _engine(tokenizer)
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=60, repetition_penalty=1.3,
                            guided_decoding={"choice": ["alpha", "beta", "gamma", "delta"]})
    out = eng.generate([tokenizer.encode("Pick:")], params, progress=False)[0]
    assert all(c.text in ("alpha", "beta", "gamma", "delta") for c in out.outputs)


@pytest.mark.parametrize("so, match", [
    ({"json": {"type": "foo"}}, "does not compile"), ({"regex": "[a-"}, "does not compile"),
    ({"grammar": "start: nothing_defined"}, "does not compile"),
])
def test_grammars_that_do_not_compile_are_refused_in_one_line(tokenizer, so, match):
    eng = _engine(tokenizer)
    with pytest.raises(StructuredOutputsError, match=match) as info:
        eng.add_request([1, 2, 3], SamplingParams(structured_outputs=so))
    assert "\n" not in str(info.value) and not eng.has_unfinished_requests()


def test_structured_outputs_need_a_tokenizer():
    eng = LLMEngine(EngineConfig(device="cpu", num_blocks=64, eos_token_id=1))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request([1, 2, 3], SamplingParams(structured_outputs={"regex": "a+"}))


def test_grammars_are_compiled_once_per_schema(tokenizer):
    eng = _engine(tokenizer)
    so = {"json": json.dumps(SCHEMA)}
    eng.add_request([1, 2], SamplingParams(structured_outputs=so))
    grammars = eng.runner.grammars
    compiled = dict(grammars._compiled)
    eng.add_request([3, 4], SamplingParams(structured_outputs={"json": SCHEMA}))  # same schema as a dict
    assert grammars._compiled == compiled and len(compiled) == 1
    np.testing.assert_equal(len(eng.generate([[5, 6]], SamplingParams(max_tokens=3), progress=False)), 1)


@pytest.mark.gpu
def test_gpu_engine_samples_validate_with_graphs_and_asynchronous_scheduling(tokenizer):
    from engine_gpu_support import _gpu_engine

    eng = _gpu_engine("float16", cuda_graph=True, eos_token_id=tokenizer.eos_token_id)
    eng.tokenizer = tokenizer
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=200, structured_outputs=so,
                             repetition_penalty=1.1 if i % 2 else 1.0) for i in range(48)]
    outs = eng.generate([tokenizer.encode("Pet:")] * 48, params, progress=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        validate(json.loads(out.outputs[0].text))
