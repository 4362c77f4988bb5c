"""Issue 21, server side: no single request, template or client can stall, freeze or fool the server.
Each test is written from a finding's description (numbers are the issue's):

 4  a huge prompt is tokenized off the event loop (and off the GIL); bodies over --max-request-body-bytes are a
    413 before they are read; prompts over --max-prompt-tokens a 400; memory returns after refused requests
 5  a chat template that never finishes is a 400 after --chat-template-timeout; /health answers meanwhile
 6  prompts x n per request is capped (--max-choices-per-request, a 400 naming it)
 7  caller mistakes are 4xx: tool_calls of the wrong type, lone surrogates, reserved chat_template_kwargs,
    booleans as token ids
 11 fairness: one client's queued batch does not make another client's request wait for all of it

Targets: under the attacks of 4, 5 and 6 another client's 8-token request completes within 2x its idle latency
(median of 3, +50 ms for timer noise on a 2-core CI machine; engine steps padded to the CPU small model's ~20 ms,
see the ``server`` fixture) and /health answers within 1 s throughout. Attackers run in a process of their own.
"""
import gc
import json
import statistics
import threading
import time

import pytest

for _name in ("tokenizers", "jinja2", "fastapi", "uvicorn", "openai", "httpx", "prometheus_client"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
from serve_support import (ENGINE_FLAGS, Flood, HealthWatch, assert_openai_error, idle_latency,  # noqa: E402
                           metrics, serve, timed_completion)
from test_text_support import write_checkpoint  # noqa: E402

SLOW_TEMPLATE = ("{% for i in range(100000) %}{% for j in range(300) %}{% endfor %}{% endfor %}"
                 "{{ messages[0]['content'] }}")  # about 4 s of rendering, no output until the end
QWEN_STYLE = ("{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
              "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}\n<tool_call>"
              "{{ tool_call.function.name }}</tool_call>{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}"
              "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
SLACK_S = 0.05


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


STEP_S = 0.02  # the CPU "small" preset's time per token on 2 cores (issue 19: >= 50 tokens/s)


def pad_steps(seconds: float):
    """An engine-loop command: every step takes at least ``seconds`` (a sleep: the GIL is free meanwhile, as it
    is while BLAS runs a real model's matmuls)."""
    def patch(engine):
        step = engine.step

        def padded():
            t0 = time.perf_counter()
            out = step()
            time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
            return out
        engine.step = padded
    return patch


@pytest.fixture(scope="module")
def server(checkpoint):
    """The tiny checkpoint's steps take ~1 ms, which would measure the 2x target against HTTP noise alone; the
    target names the CPU small model, so each step is padded to its ~20 ms (until that preset is in main)."""
    live = serve([str(checkpoint), "--served-model-name", "m", *ENGINE_FLAGS, "--chat-template-timeout", "0.5"])
    live.state.loop.call(pad_steps(STEP_S)).result(30)
    live.idle = idle_latency(live)
    yield live
    live.stop()


def victim_latency(server, runs=3) -> float:
    return statistics.median(timed_completion(server) for _ in range(runs))


def in_background(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, result


# ------------------------------------------------------------------------------------------ finding 4
def test_huge_prompt_is_tokenized_off_the_event_loop(server):
    text = "paged attention keeps blocks " * 110_000  # 3.2 MB, under the 4 MiB body limit
    body = {"model": "m", "prompt": text, "max_tokens": 4}
    with HealthWatch(server.base) as health:
        attack = Flood(server, [body])
        time.sleep(0.3)  # the big one is being tokenized now
        latency = victim_latency(server)
        [(status, _)] = attack.wait()
    assert status == 400  # context_length_exceeded, after tokenizing off the event loop
    assert health.worst < 1.0 and health.failures == 0, health.worst
    assert latency <= 2 * server.idle + SLACK_S, (latency, server.idle)


def test_body_over_the_limit_is_413_before_it_is_read(server):
    big = json.dumps({"model": "m", "prompt": "x" * (5 * 2**20)}).encode()
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/completions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(r, 413)
    assert "--max-request-body-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while it arrives
        for i in range(0, len(big), 2**16):
            yield big[i:i + 2**16]

    r = httpx.post(server.url + "/chat/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert_openai_error(r, 413)
    assert time.perf_counter() - t0 < 5.0
    assert httpx.get(server.base + "/health").status_code == 200


def test_prompt_token_limit_is_a_400_naming_it(checkpoint):
    live = serve([str(checkpoint), "--served-model-name", "m", *ENGINE_FLAGS, "--max-prompt-tokens", "32"])
    try:
        r = httpx.post(live.url + "/completions", json={"model": "m", "prompt": "word " * 200, "max_tokens": 2})
        assert "--max-prompt-tokens" in assert_openai_error(r, 400, "prompt")["message"]
        r = httpx.post(live.url + "/completions", json={"model": "m", "prompt": list(range(5, 45)), "max_tokens": 2})
        assert_openai_error(r, 400, "prompt")
        r = httpx.post(live.url + "/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": "word " * 200}]})
        assert_openai_error(r, 400, "messages")
        r = httpx.post(live.url + "/completions", json={"model": "m", "prompt": "word " * 5, "max_tokens": 2})
        assert r.status_code == 200
    finally:
        live.stop()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_memory_returns_to_idle_after_large_refused_requests(server):
    body = {"model": "m", "prompt": "memory grows " * 300_000, "max_tokens": 4}  # 3.9 MB, refused: too long
    httpx.post(server.url + "/completions", json=body, timeout=120)
    gc.collect()
    baseline = rss_bytes()
    for _ in range(4):
        assert_openai_error(httpx.post(server.url + "/completions", json=body, timeout=120), 400, "prompt")
    gc.collect()
    grown = rss_bytes() - baseline
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB over 4 refused 3.9 MB requests"


# ------------------------------------------------------------------------------------------ finding 5
def test_a_template_that_never_finishes_is_a_400_and_health_answers(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    server.state.chat_template = SLOW_TEMPLATE
    pool = server.state.workers.template_pool
    try:
        with HealthWatch(server.base) as health:
            t0 = time.perf_counter()
            r = httpx.post(server.url + "/chat/completions", json=body, timeout=60)
            refused_after = time.perf_counter() - t0
            time.sleep(0.5)
            still_rendering = pool.num_running > 0
            latency = victim_latency(server)
        message = assert_openai_error(r, 400, "messages")["message"]
        # the server's timeout, or the template's own step limit (pagedkv.text.chat_template), whichever comes first
        assert "did not finish" in message or "exceeded its limit" in message, message
        assert refused_after < 2.0
        assert health.worst < 1.0 and health.failures == 0, health.worst
    finally:
        server.state.chat_template = None
        deadline = time.monotonic() + 60
        while pool.num_running and time.monotonic() < deadline:  # the next tests run without it
            time.sleep(0.1)
    # NOTE: a Python thread cannot be stopped: a runaway render (still_rendering: True until the template
    # module's own time limit is merged) keeps a share of the GIL until it ends; the 2x target holds even so
    print(f"render still running after its 400: {still_rendering}; victim {latency:.3f} s, idle {server.idle:.3f} s")
    assert latency <= 2 * server.idle + SLACK_S, (latency, server.idle)


# ------------------------------------------------------------------------------------------ finding 6
def test_fan_out_is_capped_per_request(server):
    body = {"model": "m", "prompt": [[5, 6, 7]] * 2000, "n": 64, "max_tokens": 16}
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/completions", json=body, timeout=30)
    error = assert_openai_error(r, 400, "prompt")
    assert "--max-choices-per-request" in error["message"] and "128000" in error["message"]
    assert time.perf_counter() - t0 < 2.0
    r = httpx.post(server.url + "/completions", json={"model": "m", "prompt": "x", "n": 300, "max_tokens": 1})
    assert_openai_error(r, 400, "n")
    with HealthWatch(server.base) as health:
        attack = Flood(server, [body] * 20, concurrency=1)
        latency = victim_latency(server)
        results = attack.wait()
    assert [status for status, _ in results] == [400] * 20
    assert health.worst < 1.0
    assert latency <= 2 * server.idle + SLACK_S, (latency, server.idle)


def test_stop_strings_are_capped(server):
    body = {"model": "m", "prompt": "x", "max_tokens": 2}
    r = httpx.post(server.url + "/completions", json={**body, "stop": ["ab"] * 65})
    assert "--max-stop-strings" in assert_openai_error(r, 400, "stop")["message"]
    r = httpx.post(server.url + "/completions", json={**body, "stop": ["a" * 513]})
    assert "--max-stop-string-len" in assert_openai_error(r, 400, "stop")["message"]


# ------------------------------------------------------------------------------------------ finding 7
@pytest.fixture(scope="module")
def qwen_server(checkpoint):
    live = serve([str(checkpoint), "--served-model-name", "m", *ENGINE_FLAGS, "--chat-template", QWEN_STYLE])
    yield live
    live.stop()


def test_tool_calls_of_the_wrong_type_are_400(qwen_server):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": 5}]
    r = httpx.post(qwen_server.url + "/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 2})
    assert_openai_error(r, 400, "messages")
    good = [{"role": "user", "content": "hi"}]
    r = httpx.post(qwen_server.url + "/chat/completions", json={"model": "m", "messages": good, "max_tokens": 2})
    assert r.status_code == 200


@pytest.mark.parametrize("path, raw", [
    ("/completions", '{"model": "m", "prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/completions", '{"model": "m", "prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
                          '"text": "\\ud83d"}]}], "max_tokens": 2}'),
    ("/completions", '{"model": "m", "prompt": "ok", "stop": ["\\ud800"], "max_tokens": 2}'),
])
def test_lone_surrogates_are_400(server, path, raw):
    r = httpx.post(server.url + path, content=raw.encode(), headers={"content-type": "application/json"}, timeout=30)
    assert "surrogate" in assert_openai_error(r, 400)["message"]
    assert httpx.get(server.base + "/health").status_code == 200


@pytest.mark.parametrize("key", ["special_tokens", "source", "self", "messages", "tokenize"])
def test_reserved_chat_template_kwargs_are_400(server, key):
    r = httpx.post(server.url + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                           "chat_template_kwargs": {key: {}}})
    assert_openai_error(r, 400, "chat_template_kwargs")


def test_booleans_are_not_token_ids(server):
    for prompt in ([True, False], [[True, 5]]):
        r = httpx.post(server.url + "/completions", json={"model": "m", "prompt": prompt, "max_tokens": 2})
        assert_openai_error(r, 400)


# ----------------------------------------------------------------------------------------- finding 11
@pytest.fixture(scope="module")
def narrow_server(checkpoint):
    """Four sequences at a time: a batch of 24 prompts queues."""
    flags = [f if f != "64" else "4" for f in ENGINE_FLAGS]
    live = serve([str(checkpoint), "--served-model-name", "m", *flags])
    live.state.loop.call(pad_steps(STEP_S)).result(30)  # the queue builds faster than it drains
    live.idle = idle_latency(live)
    yield live
    live.stop()


def wait_for_queue(server, num_waiting: int, timeout: float = 60) -> None:
    """Until /metrics shows ``num_waiting`` requests waiting (the flood has arrived whole)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server.base)
        if m.get("pagedkv:num_requests_waiting", m.get("pagedkv_num_requests_waiting", 0)) >= num_waiting:
            return
        assert time.monotonic() < deadline, m
        time.sleep(0.02)


def test_a_request_does_not_wait_behind_another_clients_whole_batch(narrow_server):
    server = narrow_server
    batch = {"model": "m", "prompt": [[5 + i, 6, 7] for i in range(48)], "max_tokens": 16, "ignore_eos": True}
    attack = Flood(server, [batch])
    wait_for_queue(server, 32)  # the batch is queued and running
    latency = timed_completion(server)
    results = attack.wait()
    [(status, batch_s)] = results
    assert status == 200
    # NOTE: first-come first-served would finish the 8-token request after the 48 prompts (12 rounds of 4)
    assert latency < 0.5 * batch_s, (latency, batch_s)


def test_a_users_many_requests_share_with_another_user(narrow_server):
    server = narrow_server
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 16, "ignore_eos": True, "user": "flood"}
    attack = Flood(server, [body] * 48)
    wait_for_queue(server, 32)
    latency = timed_completion(server, user="victim")
    results = attack.wait()
    assert len(results) == 48 and all(status == 200 for status, _ in results)
    assert latency < 0.5 * max(t for _, t in results), (latency, max(t for _, t in results))
