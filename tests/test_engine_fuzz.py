"""A Hypothesis fuzz of the engine (issue 8, issue 10): random configs, pools, n, lengths, both policies, chunk
sizes, prefix caching on or off over prompts sharing prefixes, aborts and failing forwards. Every call returns or
raises ValueError promptly, every step hands the model live blocks and never writes a cached one, every accepted
request finishes exactly once, and the pool ends all free (or cached and evictable)."""
import signal

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from test_engine_prefix import checked

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.model import ModelConfig

MICRO = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                    intermediate_size=32, max_position_embeddings=256)
FUZZ = settings(max_examples=max(10, settings().max_examples // 2), deadline=None)
MAX_STEPS = 3000


class Boom(Exception):
    pass


configs = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4, 8]),
    "num_blocks": st.one_of(st.integers(1, 16), st.integers(16, 400)),
    "max_num_seqs": st.integers(1, 10),
    "extra_budget": st.integers(0, 64),
    "max_model_len": st.one_of(st.none(), st.integers(1, 160)),
    "scheduling": st.sampled_from(["continuous", "static"]),
    "enable_chunked_prefill": st.booleans(),
    "watermark": st.sampled_from([0.0, 0.01, 0.2]),
    "enable_prefix_caching": st.booleans(),
})
# (shared prefix length, own tokens, n, max_tokens, temperature, abort step code)
requests = st.lists(st.tuples(st.integers(0, 32), st.integers(1, 16), st.integers(1, 3), st.integers(1, 16),
                              st.sampled_from([0.0, 1.0]), st.integers(0, 40)), min_size=1, max_size=8)
SHARED = [(13 * j + 5) % 64 for j in range(32)]


def build(c):
    kwargs = dict(c)
    kwargs["max_num_batched_tokens"] = kwargs["max_num_seqs"] + kwargs.pop("extra_budget")
    return checked(LLMEngine(EngineConfig(model=MICRO, device="cpu", dtype="float32", **kwargs)))


def alarm(*_):
    raise TimeoutError("an engine call did not return promptly")


@FUZZ
@given(config=configs, reqs=requests, fail_at=st.one_of(st.none(), st.integers(1, 30)))
def test_engine_fuzz_every_request_finishes_and_nothing_leaks(config, reqs, fail_at):
    try:
        eng = build(config)
    except ValueError as exc:
        event(f"config refused: {str(exc).split()[0]}")
        return  # an impossible config is refused up front
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    try:
        _drive(eng, reqs, fail_at)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _drive(eng, reqs, fail_at):
    accepted, aborts = {}, {}
    for i, (shared, own, n, max_tokens, temperature, abort_step) in enumerate(reqs):
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=i, ignore_eos=True)
        try:
            rid = eng.add_request(SHARED[:shared] + [(i * 7 + j) % 64 for j in range(own)], params)
        except ValueError as exc:
            event(f"request refused: {str(exc).split()[-1]}")
            continue
        accepted[rid] = params
        if abort_step % 4 == 0:
            aborts[abort_step // 4] = rid
    if fail_at is not None:
        _fail_forward(eng, fail_at)
    finished: dict = {}
    for step in range(MAX_STEPS):
        if not eng.has_unfinished_requests():
            break
        if step in aborts and aborts[step] in eng.requests:
            out = eng.abort_request(aborts[step])
            assert out.finished and aborts[step] not in finished
            finished[aborts[step]] = out
        try:
            outs = eng.step()
        except Boom:
            continue
        for o in outs:
            assert o.request_id not in finished, "a finished request was returned twice"
            if o.finished:
                finished[o.request_id] = o
    else:
        pytest.fail(f"{len(eng.requests)} requests still unfinished after {MAX_STEPS} steps")
    assert set(finished) == set(accepted)
    event(f"accepted {min(len(accepted), 3)}+ requests")
    for rid, out in finished.items():
        assert len(out.outputs) == accepted[rid].n
        for c in out.outputs:
            assert c.finish_reason in ("length", "abort")
            assert c.finish_reason == "abort" or len(c.token_ids) == accepted[rid].max_tokens
    bm = eng.manager.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and not eng.manager.seq_ids and not eng.requests


def _fail_forward(eng, at_call):
    calls = [0]
    for name in ("prefill", "decode"):
        real = getattr(eng.model, name)

        def wrapper(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == at_call:
                raise Boom()
            return _real(*args, **kwargs)
        setattr(eng.model, name, wrapper)
