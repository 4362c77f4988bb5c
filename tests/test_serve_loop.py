"""The engine loop on a FakeEngine (the LLMEngine contract in miniature): requests in from asyncio, outputs
back, all-or-nothing submission, aborts, and a failing step that fails its requests but never the loop."""
import asyncio

import pytest

pytest.importorskip("tokenizers")

from test_text_support import FakeEngine  # noqa: E402

from pagedkv.engine import SamplingParams  # noqa: E402
from pagedkv.serve import EngineError, EngineLoop  # noqa: E402
from pagedkv.text.train import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), 512)


@pytest.fixture
def loop(tok):
    engine_loop = EngineLoop(FakeEngine(tok, max_model_len=64)).start()
    yield engine_loop
    engine_loop.shutdown()


async def drain(sink, num_prompts):
    """Every item of a sink until each prompt's final output (or an error)."""
    last, done = {}, set()
    while len(done) < num_prompts:
        for index, item in await sink.get_all():
            if index is None:
                return last, item
            last[index] = item
            if item.finished:
                done.add(index)
    return last, None


def run(coro):
    return asyncio.run(coro)


def test_requests_complete_and_free_their_blocks(loop):
    async def go():
        sink = await loop.submit([[5, 6, 7], [8, 9]], [SamplingParams(max_tokens=5, seed=1, n=2)] * 2)
        return await drain(sink, 2)

    last, error = run(go())
    assert error is None
    assert [len(c.token_ids) for i in (0, 1) for c in last[i].outputs] == [5, 5, 5, 5]
    assert all(c.finish_reason == "length" and c.text for i in (0, 1) for c in last[i].outputs)
    assert loop.call(lambda e: (e.has_unfinished_requests(), e.num_free_blocks)).result(5) == (False, 64)


def test_one_bad_prompt_queues_nothing(loop):
    async def go():
        await loop.submit([[5, 6], [1] * 70], [SamplingParams(max_tokens=4)] * 2)

    with pytest.raises(ValueError, match="max_model_len"):
        run(go())
    assert loop.call(lambda e: (e.has_unfinished_requests(), e.next_id)).result(5) == (False, 0)


def test_abort_frees_blocks_and_stops_outputs(loop):
    async def go():
        sink = await loop.submit([[5] * 40], [SamplingParams(max_tokens=20, ignore_eos=True)])
        first = await sink.get_all()
        loop.abort(sink.request_ids)
        await asyncio.wrap_future(loop.call(lambda e: None))  # the abort ran (commands run in order)
        return first

    assert run(go())
    assert loop.call(lambda e: (e.has_unfinished_requests(), e.num_free_blocks)).result(5) == (False, 64)


def test_failing_step_fails_its_requests_and_the_loop_serves_on(loop):
    async def go():
        loop.call(lambda e: setattr(e, "fail_steps", 1)).result(5)
        sink = await loop.submit([[5, 6]], [SamplingParams(max_tokens=3)])
        _, error = await drain(sink, 1)
        sink2 = await loop.submit([[5, 6]], [SamplingParams(max_tokens=3)])
        return error, await drain(sink2, 1)

    error, (last, error2) = run(go())
    assert isinstance(error, EngineError) and "injected step failure" in str(error)
    assert error2 is None and len(last[0].outputs[0].token_ids) == 3
    assert loop.is_alive and loop.num_step_errors == 1
    assert loop.call(lambda e: e.num_free_blocks).result(5) == 64


def test_call_returns_results_and_exceptions(loop):
    assert loop.call(lambda e: e.max_model_len).result(5) == 64
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda e: 1 / 0).result(5)
    assert loop.is_alive


def test_shutdown_fails_requests_in_flight(tok):
    engine_loop = EngineLoop(FakeEngine(tok, max_model_len=64)).start()

    async def go():
        engine_loop.call(lambda e: setattr(e, "step", lambda: [])).result(5)  # requests never finish
        sink = await engine_loop.submit([[5, 6]], [SamplingParams(max_tokens=3)])
        engine_loop.shutdown()
        return await drain(sink, 1)

    _, error = run(go())
    assert isinstance(error, EngineError) and "shutting down" in str(error)
    assert not engine_loop.is_alive
    with pytest.raises(EngineError):
        engine_loop.call(lambda e: None).result(5)


def test_a_failed_step_is_a_500_and_the_server_serves_on(tok):
    for name in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(name)
    import httpx
    from test_text_support import LiveServer

    from pagedkv.serve.app import ServerState, create_app

    state = ServerState(loop=EngineLoop(FakeEngine(tok, max_model_len=64)), tokenizer=tok, model_name="fake",
                        max_model_len=64)
    live = LiveServer(create_app(state))
    body = {"model": "fake", "prompt": "hello", "max_tokens": 5}
    try:
        state.loop.call(lambda e: setattr(e, "fail_steps", 1)).result(5)
        r = httpx.post(live.url + "/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
        assert "injected" not in r.json()["error"]["message"]  # issue 21: no internal text in a 500's body
        state.loop.call(lambda e: setattr(e, "fail_steps", 1)).result(5)
        lines = [line for line in httpx.post(live.url + "/completions", json={**body, "stream": True},
                                             timeout=30).text.splitlines() if line]
        assert "engine failed" in lines[-2] and "injected" not in lines[-2] and lines[-1] == "data: [DONE]"
        r = httpx.post(live.url + "/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(live.base + "/health").status_code == 200
    finally:
        live.stop()
