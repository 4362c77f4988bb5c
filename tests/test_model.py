"""The decoder on the paged cache (CPU, float32) against a dense recompute with the float64 reference."""
import itertools

import numpy as np
import pytest

from pagedkv import KVCache, PagedAttentionManager
from pagedkv.kernels import reference
from pagedkv.backend import get_backend
from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.model import DecodeBatch, LlamaModel, PrefillBatch, get_config, random_weights
from pagedkv.model.layers import Rope, causal_attention, rms_norm, silu_mul

CPU = get_backend("cpu")


def dense_forward(config, weights, tokens):
    """Logits [T, vocab] of every position, recomputed from scratch with dense reference attention."""
    tokens = np.asarray(tokens)
    pos = np.arange(len(tokens))
    rope = Rope(config.head_dim, config.rope_theta, 1024)
    nq, nkv, d = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.head_dim
    x = weights.embed[tokens]
    for lw in weights.layers:
        qkv = rms_norm(x, lw.input_norm, config.rms_norm_eps) @ lw.wqkv
        qkv = qkv + lw.bqkv if lw.bqkv is not None else qkv
        q = rope(qkv[:, :nq].reshape(-1, config.num_heads, d), pos)
        k = rope(qkv[:, nq:nq + nkv].reshape(-1, config.num_kv_heads, d), pos)
        v = qkv[:, nq + nkv:].reshape(-1, config.num_kv_heads, d)
        attn = reference.dense_attention(q, k, v, causal=True).astype(np.float32)
        x = x + attn.reshape(len(tokens), -1) @ lw.wo
        x = x + silu_mul(rms_norm(x, lw.post_norm, config.rms_norm_eps) @ lw.w_gate_up) @ lw.w_down
    return rms_norm(x, weights.final_norm, config.rms_norm_eps) @ weights.lm_head


def recompute_greedy(config, weights, prompt, num_tokens):
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(int(np.argmax(dense_forward(config, weights, tokens)[-1])))
    return tokens[len(prompt):]


def make(config_overrides=None, num_blocks=64, block_size=4, seed=0, paged_prefill=False):
    config = get_config("tiny", **(config_overrides or {}))
    weights = random_weights(config, seed=seed, dtype="float32", device="cpu")
    model = LlamaModel(config, weights, CPU, paged_prefill=paged_prefill)
    cache = KVCache(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, "float32", "cpu")
    return config, weights, model, PagedAttentionManager(cache)


def prefill(model, manager, tokens, seq_id=None, num_cached=0):
    """Prefill ``tokens`` as a new sequence, or as a continuation of ``seq_id``'s cached prefix."""
    if seq_id is None:
        seq_id = manager.add_sequence(len(tokens))
        slots = manager.slots(seq_id, 0, len(tokens))
    else:
        slots = manager.append_slots(seq_id, len(tokens))
    batch = PrefillBatch(np.asarray(tokens), np.arange(num_cached, num_cached + len(tokens)), slots, [len(tokens)],
                         [num_cached], [manager.block_table(seq_id)])
    return seq_id, model.prefill(batch, manager.kv_cache)


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_word_embeddings": True}])
def test_paged_incremental_greedy_equals_dense_recompute(overrides):
    config = get_config("tiny", **overrides)
    weights = random_weights(config, seed=1, dtype="float32", device="cpu")
    engine = LLMEngine(EngineConfig(model=config, device="cpu", num_blocks=64, block_size=4),
                       model_config=config, weights=weights)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [2, 7], list(range(10, 23))]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10), progress=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == recompute_greedy(config, weights, prompt, 10)


@pytest.mark.parametrize("paged_prefill", [False, True], ids=["dense", "paged"])
def test_prefill_logits_match_dense_forward(paged_prefill):
    config, weights, model, manager = make(paged_prefill=paged_prefill)
    tokens = [5, 17, 200, 3, 3, 90, 41, 8, 77]
    _, logits = prefill(model, manager, tokens)
    np.testing.assert_allclose(logits[0], dense_forward(config, weights, tokens)[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("paged_prefill", [False, True], ids=["dense", "paged"])
def test_prefill_over_a_forked_cached_prefix(paged_prefill):
    config, weights, model, manager = make(paged_prefill=paged_prefill)
    prefix, a, b = [9, 8, 7, 6, 5, 4], [11, 12, 13], [21, 22]
    parent, _ = prefill(model, manager, prefix)
    child = manager.fork_sequence(parent)
    _, la = prefill(model, manager, a, parent, num_cached=len(prefix))
    _, lb = prefill(model, manager, b, child, num_cached=len(prefix))
    np.testing.assert_allclose(la[0], dense_forward(config, weights, prefix + a)[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lb[0], dense_forward(config, weights, prefix + b)[-1], rtol=1e-4, atol=1e-4)
    assert manager.num_cow_copies == 1  # the shared partial block was copied once, for the first writer


@pytest.mark.parametrize("paged_prefill", [False, True], ids=["dense", "paged"])
def test_batched_prefill_and_decode_match_dense(paged_prefill):
    config, weights, model, manager = make(paged_prefill=paged_prefill)
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]]
    ids = [manager.add_sequence(len(s)) for s in seqs]
    batch = PrefillBatch(np.concatenate(seqs), np.concatenate([np.arange(len(s)) for s in seqs]),
                         np.concatenate([manager.slots(i, 0, len(s)) for i, s in zip(ids, seqs)]),
                         [len(s) for s in seqs], [0, 0, 0], [manager.block_table(i) for i in ids])
    logits = model.prefill(batch, manager.kv_cache)
    for row, s in zip(logits, seqs):
        np.testing.assert_allclose(row, dense_forward(config, weights, s)[-1], rtol=1e-4, atol=1e-4)
    nxt = [30, 31, 32]
    for i in ids:
        manager.append_slots(i, 1)
    lens = manager.context_lens(ids)
    logits = model.decode(DecodeBatch(np.array(nxt), lens - 1, manager.slot_mapping(ids), manager.block_tables(ids),
                                      lens), manager.kv_cache)
    for row, s, t in zip(logits, seqs, nxt):
        np.testing.assert_allclose(row, dense_forward(config, weights, s + [t])[-1], rtol=1e-4, atol=1e-4)


def test_causal_attention_matches_reference_with_prefix():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((7, 2, 16)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(causal_attention(q, k, v, 0.25),
                               reference.dense_attention(q, k, v, scale=0.25, causal=True), rtol=1e-5, atol=1e-5)


def test_random_weights_are_reproducible_and_presets_have_their_shapes():
    config = get_config("tiny")
    a, b = (random_weights(config, seed=3, device="cpu") for _ in range(2))
    c = random_weights(config, seed=4, device="cpu")
    np.testing.assert_array_equal(a.layers[1].wqkv, b.layers[1].wqkv)
    assert not np.array_equal(a.layers[1].wqkv, c.layers[1].wqkv)
    big = get_config("llama-1b")
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.head_dim) == (2048, 16, 32, 8, 64)
    assert (big.intermediate_size, big.vocab_size, big.tie_word_embeddings) == (8192, 128256, True)
    assert 1.23e9 < big.num_params() < 1.24e9


def test_config_errors():
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", num_kv_heads=3)


def test_varlen_attention_matches_per_sequence_attention():
    from pagedkv.model.layers import varlen_causal_attention, varlen_plan

    rng = np.random.default_rng(1)
    lens = [5, 1, 9, 3]
    q = rng.standard_normal((sum(lens), 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((sum(lens), 2, 16)).astype(np.float32) for _ in range(2))
    starts = np.concatenate([[0], np.cumsum(lens)])
    want = np.concatenate([causal_attention(q[a:b], k[a:b], v[a:b], 0.3) for a, b in itertools.pairwise(starts)])
    for max_elements in (1 << 28, 200):  # one padded group, or several
        plan = varlen_plan(lens, 4, 2, max_elements=max_elements)
        assert (len(plan) == 1) == (max_elements > 1000)
        np.testing.assert_allclose(varlen_causal_attention(q, k, v, plan, 0.3), want,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("paged_prefill", [None, False, True], ids=["reference", "dense", "paged"])
def test_mixed_step_chunk_and_decode_rows_with_chosen_logit_rows(paged_prefill):
    """One forward holding a prompt's second chunk, a decode row and a whole prompt; logits of chosen rows."""
    config, weights, model, manager = make(paged_prefill=paged_prefill)
    a, b, c = [4, 8, 15, 16, 23, 42, 7], [9, 9, 3, 1], [100, 101, 102]
    sa, _ = prefill(model, manager, a[:3])  # a's first chunk
    sb, _ = prefill(model, manager, b[:3])  # b decodes its 4th token
    sc = manager.add_sequence(len(c))
    slots = np.concatenate([manager.append_slots(sa, 4), manager.append_slots(sb, 1), manager.slots(sc, 0, 3)])
    batch = PrefillBatch(np.array(a[3:] + b[3:] + c), np.array([3, 4, 5, 6, 3, 0, 1, 2]), slots, [4, 1, 3],
                         [3, 3, 0], [manager.block_table(s) for s in (sa, sb, sc)], logit_rows=np.array([1, 3, 4, 7]))
    logits = model.prefill(batch, manager.kv_cache)
    want = [dense_forward(config, weights, a)[4], dense_forward(config, weights, a)[-1],
            dense_forward(config, weights, b)[-1], dense_forward(config, weights, c)[-1]]
    np.testing.assert_allclose(logits, np.array(want), rtol=1e-4, atol=1e-4)


def test_host_products_do_not_depend_on_the_batch():
    from pagedkv.model.llama import host_matmul

    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 64)).astype(np.float32)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    whole = host_matmul(x, w)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 20)):
        np.testing.assert_array_equal(host_matmul(x[rows], w), whole[rows])
    import ml_dtypes

    assert host_matmul(x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16)).dtype == ml_dtypes.bfloat16
