"""Beam search (pagedkv.beam.search) against an exhaustive float64 reference beam search, and its blocks.

The reference recomputes the whole forward of every live beam's sequence at every step in float64 NumPy from
the model's weights (no cache at all) and applies vLLM's rules plainly. Inputs are chosen so that no near-tie
decides: every decision the reference takes has a margin far above the engine's float32 error (asserted).
"""
import math

import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.beam.group import BeamGroup, top_candidates, worst_case_blocks
from pagedkv.beam.search import BeamSearchParams, beam_search, beam_search_text, eos_ids, prefix_hasher

BLOCK_SIZE = 4
LOGPROB_TOL = 5e-5  # float32 engine vs float64 reference, per cumulative log-probability (seen: ~1e-6 a token)
MIN_MARGIN = 2 * LOGPROB_TOL  # every reference decision is separated by more than this
PROMPTS = [[11, 5, 201, 73, 9, 140, 38], [200, 3, 77, 18, 99], [57, 130, 2, 250, 61, 6, 12, 88, 41]]


# ----------------------------------------------------------------------------------------- engines
def make_engine(prefix_caching=False, num_blocks=128, seed=3, **overrides):
    """A tiny random Llama on the CPU, with or without prefix caching."""
    return LLMEngine(EngineConfig(device="cpu", num_blocks=num_blocks, block_size=BLOCK_SIZE, seed=seed,
                                  enable_prefix_caching=prefix_caching, **overrides))


# --------------------------------------------------------------------------------- float64 reference
class Reference64:
    """The Llama forward in float64 from the engine's weights; ``logprobs(tokens)`` of the next token."""

    def __init__(self, engine):
        c, w = engine.model_config, engine.model.weights
        f = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
        self.c, self.embed, self.final_norm, self.lm_head = c, f(w.embed), f(w.final_norm), f(w.lm_head)
        self.layers = [tuple(f(a) for a in (lw.input_norm, lw.wqkv, lw.bqkv, lw.wo, lw.post_norm, lw.w_gate_up,
                                            lw.w_down)) for lw in w.layers]
        self.inv_freq = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)
        self.memo = {}

    def norm(self, x, weight):
        return weight * x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.c.rms_norm_eps)

    def rope(self, x):
        angle = np.arange(x.shape[0])[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def attention(self, q, k, v):
        c, n = self.c, q.shape[0]
        group = c.num_heads // c.num_kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)
        s = np.where(np.tril(np.ones((n, n), dtype=bool))[None], s, -np.inf)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        return np.einsum("hqk,khd->qhd", p / p.sum(axis=-1, keepdims=True), v)

    def logprobs(self, tokens) -> np.ndarray:
        key = tuple(tokens)
        if key not in self.memo:
            self.memo[key] = self._logprobs(np.asarray(tokens))
        return self.memo[key]

    def _logprobs(self, tokens):
        c, x = self.c, self.embed[tokens]
        nq, nkv, d = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
        for in_norm, wqkv, bqkv, wo, post_norm, w_gate_up, w_down in self.layers:
            qkv = self.norm(x, in_norm) @ wqkv + (0 if bqkv is None else bqkv)
            q = self.rope(qkv[:, :nq].reshape(-1, c.num_heads, d))
            k = self.rope(qkv[:, nq:nq + nkv].reshape(-1, c.num_kv_heads, d))
            v = qkv[:, nq + nkv:].reshape(-1, c.num_kv_heads, d)
            x = x + self.attention(q, k, v).reshape(len(tokens), -1) @ wo
            gate, up = np.split(self.norm(x, post_norm) @ w_gate_up, 2, axis=-1)
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w_down
        z = (self.norm(x[-1:], self.final_norm) @ self.lm_head)[0]
        z = z - z.max()
        return z - np.log(np.exp(z).sum())


def reference_beam_search(ref, prompt, width, max_tokens, eos=(), length_penalty=1.0):
    """vLLM's beam search, plainly: returns ([(tokens, cum_logprob, score, finish_reason)] best first, the
    smallest margin of any decision taken (top-2w cut of each beam, best-w cut of each step, final cut) in
    log-probability units: how far the two sides' log-probabilities must move to swap them)."""
    def score(tokens, cum, reason):
        return cum / (len(prompt) + len(tokens) - (reason == "stop")) ** length_penalty

    def margin(a, b):  # the log-probability error that would swap a and b: the gap in cum_logprob units
        weight = lambda c: 1 / (len(prompt) + len(c[0]) - (c[-1] == "stop")) ** length_penalty  # noqa: E731
        return (score(*a) - score(*b)) / (weight(a) + weight(b))

    live, finished, margins = [((), 0.0)], [], []
    for step in range(max_tokens):
        candidates = []
        for tokens, cum in live:
            lp = ref.logprobs(list(prompt) + list(tokens))
            order = sorted(range(len(lp)), key=lambda t: (-lp[t], t))
            margins.append(lp[order[2 * width - 1]] - lp[order[2 * width]])
            for t in order[:2 * width]:
                if t in eos:
                    finished.append((tokens + (t,), cum + lp[t], "stop"))
                else:
                    candidates.append((tokens + (t,), cum + lp[t]))
        candidates = sorted(((t, cum, None) for t, cum in candidates), key=lambda c: score(*c), reverse=True)
        if len(candidates) > width:
            margins.append(margin(candidates[width - 1], candidates[width]))
        live = [(t, cum) for t, cum, _ in candidates[:width]]
        if not live:
            break
    finished += [(tokens, cum, "length") for tokens, cum in live]
    ranked = sorted(((score(*f), f) for f in finished), key=lambda sf: sf[0], reverse=True)
    if len(ranked) > width:
        margins.append(margin(ranked[width - 1][1], ranked[width][1]))
    return [(list(t), cum, s, reason) for s, (t, cum, reason) in ranked[:width]], min(margins)


def pick_eos(ref, prompt, width, max_tokens):
    """Two EOS ids that the search meets: a runner-up first token, and the best token of the best beam at
    step 3 (so beams end early, at different lengths)."""
    first = ref.logprobs(prompt)
    runner_up = int(np.argsort(-first, kind="stable")[2])
    beams, _ = reference_beam_search(ref, prompt, width, 3, eos=(runner_up,))
    best = int(np.argmax(ref.logprobs(prompt + beams[0][0])))
    return (runner_up, best)


def assert_same_beams(out, want):
    assert [s.token_ids for s in out.sequences] == [w[0] for w in want]
    assert [s.finish_reason for s in out.sequences] == [w[3] for w in want]
    for s, (_, cum, score, _) in zip(out.sequences, want):
        assert s.cumulative_logprob == pytest.approx(cum, abs=LOGPROB_TOL)
        assert s.score == pytest.approx(score, abs=LOGPROB_TOL)
        assert sum(s.logprobs) == pytest.approx(s.cumulative_logprob, abs=1e-9)


# ---------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.5])
def test_beams_and_scores_equal_the_float64_reference(prefix_caching, length_penalty):
    engine = make_engine(prefix_caching)
    ref, width, max_tokens = Reference64(engine), 3, 7
    eos = pick_eos(ref, PROMPTS[0], width, max_tokens)
    wants = [reference_beam_search(ref, p, width, max_tokens, eos, length_penalty) for p in PROMPTS]
    assert min(margin for _, margin in wants) > MIN_MARGIN  # no near-tie decides
    reasons = {w[3] for want, _ in wants for w in want}
    # EOS ends some returned beams; a large length penalty favours the longest ones instead
    assert reasons == ({"length"} if length_penalty > 1 else {"stop", "length"})
    prefill, fed = engine.model.prefill, []
    engine.model.prefill = lambda batch, cache: fed.append(len(batch.token_ids)) or prefill(batch, cache)
    for run in range(2):  # the second run starts on cached prompt blocks when caching is on
        outs = beam_search(engine, PROMPTS, width, max_tokens, length_penalty, eos_token_ids=eos)
        hit = run == 1 and prefix_caching  # every full prompt block but a last one that ends the prompt
        assert fed.pop() == sum(len(p) - ((len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE if hit else 0) for p in PROMPTS)
        for out, prompt, (want, _) in zip(outs, PROMPTS, wants):
            assert out.prompt_token_ids == prompt
            assert_same_beams(out, want)
        assert engine.manager.block_manager.num_used_blocks == 0 and not engine.manager.seq_ids


def test_beam_search_starts_on_blocks_the_engine_cached():
    """Beam search names blocks as the engine does (its prefix cache's hasher): a prompt the engine ran is found."""
    engine, prompt = make_engine(prefix_caching=True), PROMPTS[2]
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2), progress=False)
    prefill, fed = engine.model.prefill, []
    engine.model.prefill = lambda batch, cache: fed.append(len(batch.token_ids)) or prefill(batch, cache)
    out = beam_search(engine, [prompt], 3, 5)[0]
    assert fed == [len(prompt) - (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE]  # 8 of 9 tokens were cached
    assert out.sequences == beam_search(make_engine(), [prompt], 3, 5)[0].sequences


def test_ignore_eos_and_the_engines_eos_ids():
    engine = make_engine()
    ref, width, max_tokens = Reference64(engine), 4, 5
    eos = pick_eos(ref, PROMPTS[1], width, max_tokens)
    no_eos, margin = reference_beam_search(ref, PROMPTS[1], width, max_tokens)
    assert margin > MIN_MARGIN
    out = beam_search(engine, [PROMPTS[1]], width, max_tokens, eos_token_ids=eos, ignore_eos=True)[0]
    assert_same_beams(out, no_eos)
    assert all(s.finish_reason == "length" and len(s.token_ids) == max_tokens for s in out.sequences)
    with_eos = make_engine(eos_token_id=eos)  # eos_token_ids None: the engine's
    want, margin = reference_beam_search(ref, PROMPTS[1], width, max_tokens, eos)
    assert margin > MIN_MARGIN
    assert_same_beams(beam_search(with_eos, PROMPTS[1], width, max_tokens)[0], want)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
def test_beam_width_one_is_greedy_generate(prefix_caching):
    engine = make_engine(prefix_caching)
    greedy = make_engine().generate(PROMPTS, SamplingParams(temperature=0, max_tokens=9, logprobs=0),
                                    progress=False)
    outs = beam_search(engine, PROMPTS, 1, 9)
    for out, g in zip(outs, greedy):
        (s,) = out.sequences
        assert s.token_ids == g.outputs[0].token_ids
        assert s.cumulative_logprob == pytest.approx(g.outputs[0].cumulative_logprob, abs=LOGPROB_TOL)


def test_shared_and_copied_blocks_give_the_same_beams():
    """The no-sharing baseline of experiments.memory_share: every child a full copy; results bit-identical."""
    engine = make_engine(num_blocks=256)
    params = BeamSearchParams(4, 8)
    runs = []
    for share in (True, False):
        search = BeamGroup(engine, PROMPTS, params, frozenset(), share_blocks=share)
        runs.append([[(b.token_ids, b.cum_logprob) for b in beams] for beams in search.run()])
    assert runs[0] == runs[1]
    assert engine.manager.block_manager.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_gpu_beams_equal_the_float64_reference(cuda_graph):
    """The device path (float32 cuBLAS without TF32, paged kernels, CuPy argpartition; CUDA graphs) on the
    CPU engine's weights. Margins checked on the CPU: > 4e-3 for these inputs (seed 4, head_dim 32)."""
    import cupy as cp

    from pagedkv.model import get_config
    from pagedkv.model.weights import LayerWeights, ModelWeights

    config = get_config("tiny", head_dim=32)  # the GPU kernels' smallest head_dim
    cpu = LLMEngine(EngineConfig(model=config, device="cpu", seed=4, num_blocks=128, block_size=16))
    w, dev = cpu.model.weights, (lambda a: None if a is None else cp.asarray(a))  # noqa: E731
    layers = [LayerWeights(*(dev(getattr(lw, f)) for f in LayerWeights.__slots__)) for lw in w.layers]
    weights = ModelWeights(dev(w.embed), layers, dev(w.final_norm), dev(w.lm_head), w.tied)
    gpu = LLMEngine(EngineConfig(model=config, device="gpu", dtype="float32", num_blocks=128, block_size=16,
                                 cuda_graph=cuda_graph), model_config=config, weights=weights)
    ref = Reference64(cpu)
    wants = [reference_beam_search(ref, p, 3, 6) for p in PROMPTS]
    assert min(margin for _, margin in wants) > 4e-3
    for out, (want, _) in zip(beam_search(gpu, PROMPTS, 3, 6), wants):
        assert_same_beams(out, want)
    assert gpu.manager.block_manager.num_used_blocks == 0
    greedy = gpu.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6), progress=False)
    assert [o.sequences[0].token_ids for o in beam_search(gpu, PROMPTS, 1, 6)] == \
        [g.outputs[0].token_ids for g in greedy]


# --------------------------------------------------------------------------------------------- blocks
def check_blocks(search: BeamGroup, manager, cow_before: int) -> None:
    """Live beams own exactly the manager's sequences; the pool's used blocks are one per distinct token
    prefix of each block position; copy-on-write happened once per extra child of a partial-block parent."""
    bm, bs = manager.block_manager, manager.block_size
    assert set(manager.seq_ids) == {b.seq_id for b in search.live}
    owner = {}  # token prefix of a block -> the block holding it
    for beam in search.live:
        tokens = search.prompts[beam.prompt_index] + beam.token_ids
        assert manager.context_len(beam.seq_id) == len(tokens)
        for i, block in enumerate(manager.block_table(beam.seq_id)):
            prefix = tuple(tokens[:(i + 1) * bs])
            assert owner.setdefault(prefix, block) == block  # a common prefix is one block
    assert len(set(owner.values())) == len(owner)  # different prefixes never share a block
    assert bm.num_used_blocks == len(owner)
    bm.check_invariants()
    kids = {}
    for beam in search.live:
        parent = tuple(search.prompts[beam.prompt_index] + beam.token_ids[:-1])
        kids[parent] = kids.get(parent, 0) + 1
    copies = sum(n - 1 for parent, n in kids.items() if len(parent) % bs)
    assert manager.num_cow_copies - cow_before == copies


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
def test_blocks_after_every_step_and_all_free_at_the_end(prefix_caching):
    engine = make_engine(prefix_caching)
    m, params = engine.manager, BeamSearchParams(4, 12)
    for _ in range(2):
        search = BeamGroup(engine, PROMPTS, params, frozenset({PROMPTS[0][0]}), hasher=prefix_hasher(engine))
        cow = m.num_cow_copies
        search.start()
        check_blocks(search, m, cow)
        peak = m.block_manager.num_used_blocks
        while not search.done:
            cow, before = m.num_cow_copies, {b.seq_id for b in search.live}
            search.step()
            check_blocks(search, m, cow)
            dropped = before - {b.seq_id for b in search.live}
            assert all(s not in m.seq_ids for s in dropped)  # a dropped beam's sequence is gone at once
            peak = max(peak, m.block_manager.num_used_blocks)
        assert m.block_manager.num_used_blocks == 0 and not m.seq_ids
        worst = sum(worst_case_blocks(len(p), 12, 4, BLOCK_SIZE, True) for p in PROMPTS)
        naive = sum(4 * -(-(len(p) + 11) // BLOCK_SIZE) for p in PROMPTS)
        assert peak <= worst < naive


def test_long_shared_prompt_is_held_once():
    """A 41-token prompt (10 full blocks) searched with 8 beams: its full blocks are held once."""
    engine = make_engine(num_blocks=128)
    prompt = list(range(100, 141))
    search = BeamGroup(engine, [prompt], BeamSearchParams(8, 6), frozenset())
    search.start()
    while not search.done:
        search.step()
        if search.live:
            tables = [engine.manager.block_table(b.seq_id) for b in search.live]
            assert all(t[:10] == tables[0][:10] for t in tables)
            assert engine.manager.block_manager.num_used_blocks <= 10 + 8 * 2
    assert engine.manager.block_manager.num_used_blocks == 0


def test_prompts_that_do_not_fit_together_run_in_groups():
    """A pool holding one prompt's worst case at a time: prompts are searched one group after another, with
    the same results as alone; max_num_seqs bounds a group's rows too."""
    p, width, max_tokens = PROMPTS, 3, 6
    need = max(worst_case_blocks(len(q), max_tokens, width, BLOCK_SIZE, True) for q in p)
    alone = [beam_search(make_engine(), [q], width, max_tokens)[0] for q in p]
    for engine in (make_engine(num_blocks=need), make_engine(max_num_seqs=width)):
        outs = beam_search(engine, p, width, max_tokens)
        assert [o.sequences for o in outs] == [o.sequences for o in alone]


def test_top_candidates_match_a_float64_ranking():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    logits[2, [7, 9]] = logits[2].max() + 1  # an exact tie: the lower id first
    ids, lps = top_candidates(logits, 6)
    z = logits.astype(np.float64)
    want_lp = z - z.max(axis=-1, keepdims=True)
    want_lp -= np.log(np.exp(want_lp).sum(axis=-1, keepdims=True))
    for row in range(5):
        order = sorted(range(300), key=lambda t: (-want_lp[row, t], t))[:6]
        assert ids[row].tolist() == order
        np.testing.assert_allclose(lps[row], want_lp[row, order], atol=1e-5)
    assert ids[2, :2].tolist() == [7, 9]
    assert top_candidates(logits[:, :4], 6)[0].shape == (5, 4)  # fewer tokens than asked: all of them


# --------------------------------------------------------------------------------------------- errors
def snapshot(engine):
    return engine.manager.snapshot()


def pool_state(engine):
    """The pool as sets: which blocks are free, evictable, referenced how often and named how (the order of
    the free list, an allocator detail, left out), and the sequences."""
    pool, seqs, _ = engine.manager.snapshot()
    return sorted(pool.free_ids), pool.ref_counts, sorted(pool.evictable_ids), pool.block_hashes, seqs


@pytest.mark.parametrize("kwargs, match", [
    (dict(beam_width=0), "beam_width"), (dict(beam_width=True), "beam_width"), (dict(beam_width=2.0), "beam_width"),
    (dict(max_tokens=0), "max_tokens"), (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(length_penalty="1"), "length_penalty"), (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(eos_token_ids=[-1]), "eos_token_ids"), (dict(eos_token_ids=[256]), "vocabulary"),
    (dict(prompts_token_ids=[]), "prompts_token_ids"), (dict(prompts_token_ids=[[1, 2], []]), "prompt 1"),
    (dict(prompts_token_ids=[[1, 300]]), "vocabulary"), (dict(prompts_token_ids=["hello"]), "text"),
    (dict(max_tokens=2000), "max_model_len"), (dict(beam_width=300), "max_num_seqs"),
    (dict(beam_width=64, max_tokens=40), "blocks"),
])
def test_bad_arguments_are_refused_before_anything_changes(kwargs, match):
    engine = make_engine(num_blocks=128)
    before = snapshot(engine)
    args = dict(prompts_token_ids=PROMPTS, beam_width=2, max_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        beam_search(engine, **args)
    assert snapshot(engine) == before


def test_a_busy_engine_is_refused():
    engine = make_engine()
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=3))
    engine.step()
    before = snapshot(engine)
    with pytest.raises(ValueError, match="idle"):
        beam_search(engine, PROMPTS, 2, 3)
    assert snapshot(engine) == before


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("where, after", [("decode", 0), ("decode", 3), ("prefill", 0)])
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
def test_an_exception_mid_search_frees_everything(monkeypatch, exc, where, after, prefix_caching):
    engine = make_engine(prefix_caching)
    beam_search(engine, PROMPTS[:1], 2, 3)  # with caching: the first prompt's blocks are cached now
    before, free = pool_state(engine), engine.manager.block_manager.num_free_blocks
    real, calls = getattr(engine.model, where), []

    def failing(*args):
        calls.append(1)
        if len(calls) > after:
            raise exc("injected")
        return real(*args)

    monkeypatch.setattr(engine.model, where, failing)
    with pytest.raises(exc):
        beam_search(engine, PROMPTS, 3, 8)
    bm = engine.manager.block_manager
    assert bm.num_used_blocks == 0 and not engine.manager.seq_ids and bm.num_free_blocks == free
    bm.check_invariants()
    if not prefix_caching or where == "prefill":  # (caching: prefilled prompt blocks stay cached, evictable)
        assert pool_state(engine) == before
    monkeypatch.undo()
    assert beam_search(engine, PROMPTS, 3, 4)[0].sequences  # still usable


# ----------------------------------------------------------------------------------------------- text
class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"<{i}>" for i in ids)

    def encode(self, text):
        return [int(w) for w in text.split()]


class FakeLLM:
    """The two things beam_search_text uses from pagedkv.LLM: engine, tokenizer, encode."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    def encode(self, prompt):
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def test_beam_search_text_encodes_prompts_and_decodes_beams():
    engine = make_engine(eos_token_id=pick_eos(Reference64(make_engine()), PROMPTS[0], 3, 6))
    llm = FakeLLM(engine, FakeTokenizer())
    outs = beam_search_text(llm, ["11 5 201 73 9 140 38", PROMPTS[1]], 3, 6)
    assert outs[0].prompt == "11 5 201 73 9 140 38" and outs[1].prompt is None
    want = beam_search(engine, PROMPTS[:2], 3, 6)
    assert [[s.token_ids for s in o.sequences] for o in outs] == [[s.token_ids for s in o.sequences] for o in want]
    for s in outs[0].sequences + outs[1].sequences:
        kept = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
        assert s.text == " ".join(f"<{i}>" for i in kept)
    assert any(s.finish_reason == "stop" for s in outs[0].sequences)
    single = beam_search_text(llm, "200 3 77 18 99", 2, 3)
    assert len(single) == 1 and single[0].prompt_token_ids == PROMPTS[1]


def test_beam_search_text_with_the_real_llm(tmp_path):
    """pagedkv.LLM on a checkpoint with a trained tokenizer: text prompts, decoded beams, the checkpoint's EOS."""
    pytest.importorskip("tokenizers")
    from test_text_support import write_checkpoint

    from pagedkv.llm import LLM

    llm = LLM(str(write_checkpoint(tmp_path)), device="cpu", num_blocks=64, block_size=16, max_model_len=256)
    text = "Paged attention stores"
    outs = beam_search_text(llm, [text, "Café — 中文 😀"], 3, 12)
    by_ids = beam_search_text(llm, [llm.tokenizer.encode(text)], 3, 12)[0]
    assert [s.token_ids for s in outs[0].sequences] == [s.token_ids for s in by_ids.sequences]
    assert outs[0].prompt == text and by_ids.prompt is None
    for s in outs[0].sequences + outs[1].sequences:
        assert s.text == llm.tokenizer.decode(s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids)
        assert s.finish_reason == "length" or s.token_ids[-1] in llm.engine.eos_token_ids
    preset = LLM("tiny", device="cpu", num_blocks=64, block_size=BLOCK_SIZE)  # no tokenizer: ids only
    assert [len(o.sequences) for o in beam_search_text(preset, PROMPTS, 2, 4)] == [2, 2, 2]
    with pytest.raises(ValueError, match="tokenizer"):
        beam_search_text(preset, "some text", 2, 4)


def test_params_and_eos_resolution():
    engine = make_engine(eos_token_id=(5, 6))
    assert eos_ids(engine, BeamSearchParams(2, 3)) == {5, 6}
    assert eos_ids(engine, BeamSearchParams(2, 3, eos_token_ids=7)) == {7}
    assert BeamSearchParams(2, 3, eos_token_ids=np.int64(7)).eos_token_ids == (7,)
