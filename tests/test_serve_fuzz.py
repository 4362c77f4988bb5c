"""A Hypothesis fuzzer over request bodies against a live CPU server: every answer is a 200 or a 4xx with
OpenAI's error JSON (never a 5xx, never a dropped connection), and the server is healthy after each.

Bodies mix valid fields with wrong types, out-of-range values, lone surrogates, huge or empty values and unknown
keys; sizes are bounded (max_model_len 64, a few choices per request) so that the run stays in CI's budget."""
import json

import pytest

for _name in ("tokenizers", "jinja2", "fastapi", "uvicorn", "httpx", "prometheus_client", "hypothesis"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serve_support import serve  # noqa: E402
from test_text_support import write_checkpoint  # noqa: E402

FLAGS = ["--device", "cpu", "--num-gpu-blocks-override", "64", "--block-size", "16", "--max-model-len", "64",
         "--max-num-seqs", "8", "--max-choices-per-request", "8", "--chat-template-timeout", "2"]

texts = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00", "", " " * 200,
                                                         "{{ 7*7 }}", "\x00", "<s></s>"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
small_ints = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, -2**63, 10**30]))
token_ids = st.lists(st.one_of(st.integers(-2, 600), st.booleans()), max_size=12)
prompts = st.one_of(texts, token_ids, st.lists(texts, max_size=3), st.lists(token_ids, max_size=3), json_values)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                    "content": st.one_of(texts, st.none(), st.lists(st.fixed_dictionaries(
                                        {"type": st.sampled_from(["text", "image_url"]), "text": texts}),
                                        max_size=2))},
                                   optional={"tool_calls": json_values, "name": json_values}), max_size=3),
    json_values)
OPTIONAL = {
    "max_tokens": small_ints, "n": small_ints, "temperature": st.one_of(st.floats(-1, 3), scalars),
    "top_p": st.one_of(st.floats(-0.5, 1.5), scalars), "top_k": small_ints, "min_p": st.floats(-1, 2),
    "seed": small_ints, "stop": st.one_of(texts, st.lists(texts, max_size=3), json_values),
    "stream": st.booleans(), "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                                         json_values),
    "logprobs": st.one_of(small_ints, st.booleans()), "top_logprobs": small_ints, "echo": st.booleans(),
    "presence_penalty": st.one_of(st.floats(-3, 3), scalars), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3), "min_tokens": small_ints,
    "logit_bias": st.one_of(st.dictionaries(st.one_of(texts, st.integers(0, 600).map(str)), st.floats(-200, 200),
                                            max_size=3), json_values),
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
                                 json_values),
    "ignore_eos": st.booleans(), "stop_token_ids": st.one_of(token_ids, json_values), "user": texts,
    "chat_template_kwargs": st.one_of(st.dictionaries(st.sampled_from(["enable_thinking", "self", "source",
                                                                       "special_tokens", "x"]), json_values,
                                                      max_size=2), json_values),
    "tools": json_values, "suffix": texts, "best_of": small_ints, "unknown_field": json_values,
}


VALID = {
    "max_tokens": st.integers(1, 8), "n": st.integers(1, 3), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1), "seed": st.integers(0, 99),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "user": st.sampled_from(["a", "b"]), "echo": st.booleans(),
    "presence_penalty": st.just(0.0), "logit_bias": st.just({}), "response_format": st.just({"type": "text"}),
    "chat_template_kwargs": st.just({"enable_thinking": False}),
}
VALID_PROMPTS = st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(3, 500), min_size=1, max_size=8),
                          st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=2))
VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                 "content": st.text(max_size=30)}), min_size=1, max_size=3)


def bodies(required: dict, valid: dict):
    """Mostly valid bodies (a model the server serves, sane sizes) with up to two fields replaced by anything
    (wrong types, out of range, surrogates, unknown keys); and wholly random ones."""
    base = st.fixed_dictionaries({"model": st.just("m"), **valid}, optional=VALID)
    wild = st.dictionaries(st.sampled_from(["model", *required, *OPTIONAL]),
                           st.one_of(json_values, *OPTIONAL.values(), *required.values()), max_size=2)
    mutated = st.builds(lambda b, w: {**b, **w}, base, wild)
    anything = st.fixed_dictionaries({"model": st.one_of(st.just("m"), texts, json_values), **required},
                                     optional=OPTIONAL)
    return st.one_of(base, mutated, mutated, anything, json_values)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = serve([str(write_checkpoint(tmp_path_factory.mktemp("ckpt"))), "--served-model-name", "m", *FLAGS])
    yield live
    live.stop()


def check(server, path: str, body) -> None:
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()  # NOTE: lone surrogates as \ud800 escapes
    try:
        r = server.http.post(server.url + path, content=raw, headers={"content-type": "application/json"},
                             timeout=60)
    except httpx.HTTPError as exc:
        raise AssertionError(f"connection failed on {raw[:300]!r}: {exc}") from None
    event(f"status {r.status_code}")
    if r.status_code == 200:
        if body.get("stream") is True:
            lines = [line for line in r.text.split("\n") if line]  # NOTE: SSE lines end in \n only (not \x85)
            assert lines and lines[-1] == "data: [DONE]", r.text[-300:]
            assert all(line.startswith("data: ") for line in lines)
            assert not any('"error"' in line for line in lines), r.text[-500:]
        else:
            assert r.json()["choices"], r.text[:300]
    else:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500], raw[:300])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert server.http.get(server.base + "/health", timeout=5).status_code == 200


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=bodies({"prompt": prompts}, {"prompt": VALID_PROMPTS}))
def test_fuzz_completions(server, body):
    check(server, "/completions", body)


@FUZZ
@given(body=bodies({"messages": messages}, {"messages": VALID_MESSAGES}))
def test_fuzz_chat(server, body):
    check(server, "/chat/completions", body)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.fixed_dictionaries({}, optional={"prompt": prompts, "messages": messages,
                                                          "model": texts, "add_special_tokens": scalars}),
                      json_values))
def test_fuzz_tokenize(server, body):
    r = server.http.post(server.base + "/tokenize", content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200 or (400 <= r.status_code < 500 and set(r.json()["error"]) ==
                                    {"message", "type", "param", "code"}), (r.status_code, r.text[:300])
    assert server.http.get(server.base + "/health", timeout=5).status_code == 200
