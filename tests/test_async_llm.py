"""AsyncLLM (pagedkv.engine.async_llm) on a FakeEngine: ``async for out in llm.generate(...)``, aborts when the
consumer stops or is cancelled, and round-robin admission across groups under the max_num_seqs cap."""
import asyncio

import pytest

pytest.importorskip("tokenizers")

from test_text_support import FakeEngine  # noqa: E402

from pagedkv.engine.async_llm import AsyncLLM  # noqa: E402
from pagedkv.sampling_params import SamplingParams  # noqa: E402
from pagedkv.text.train import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), 512)


@pytest.fixture
def llm(tok):
    engine = AsyncLLM(FakeEngine(tok, max_model_len=64, max_num_seqs=4)).start()
    yield engine
    engine.shutdown()


def idle(llm) -> bool:
    return llm.call(lambda e: (not e.has_unfinished_requests(), e.num_free_blocks == 64)).result(5) == (True, True)


def test_generate_yields_cumulative_outputs_to_the_finished_one(llm):
    async def go():
        return [out async for out in llm.generate([5, 6, 7], SamplingParams(max_tokens=6, seed=1), "r-1")]

    outs = asyncio.run(go())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].request_id == "r-1" and len(outs[-1].outputs[0].token_ids) == 6
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths)
    assert idle(llm)


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_a_consumer_that_stops_aborts_its_request(llm, how):
    params = SamplingParams(max_tokens=60, ignore_eos=True)

    async def consume(seen):
        async for out in llm.generate([5] * 3, params):
            seen.append(out)
            if how == "break" and len(seen) == 2:
                break

    async def go():
        llm.call(lambda e: setattr(e, "step", _slow(e.step))).result(5)
        seen = []
        task = asyncio.ensure_future(consume(seen))
        if how == "cancel":
            while len(seen) < 2:
                await asyncio.sleep(0.01)
            task.cancel()
        with pytest.raises(asyncio.CancelledError) if how == "cancel" else _nothing():
            await task
        await asyncio.sleep(0.05)
        return seen

    seen = asyncio.run(go())
    assert len(seen) >= 2 and not seen[-1].finished
    assert idle(llm)


def _slow(step):
    import time

    def slow():
        time.sleep(0.01)
        return step()
    return slow


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_admission_is_round_robin_across_groups(llm):
    """Group a queues 12 prompts at once; group b's one prompt, queued after, is admitted as soon as a seat
    frees (max_num_seqs 4), not after all of a's."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def go():
        order = []

        async def run(sink, name, count):
            done = 0
            while done < count:
                for index, out in await sink.get_all():
                    if out.finished:
                        done += 1
                        order.append(name)

        llm.call(lambda e: setattr(e, "step", _slow(e.step))).result(5)  # the readers keep up with the steps
        a = await llm.submit([[5, i] for i in range(12)], [params] * 12, group="a")
        b = await llm.submit([[7, 7]], [params], group="b")
        await asyncio.gather(run(a, "a", 12), run(b, "b", 1))
        return order

    order = asyncio.run(go())
    assert order.index("b") <= 7, order  # in the second round of 4; first-come first-served: last (index 12)
    assert idle(llm)


def test_duplicate_request_ids_are_refused_before_anything_is_queued(llm):
    async def go():
        await llm.submit([[5, 6], [5, 6]], [SamplingParams(max_tokens=2)] * 2, request_ids=["x", "x"])

    with pytest.raises(ValueError, match="unique"):
        asyncio.run(go())
    assert idle(llm)
