"""NCCL collectives of a tensor-parallel rank on one GPU (a world of one rank: what a single GPU can check of
issue 22; the two-GPU runs need a machine with several GPUs). Skipped without a GPU or without NCCL."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def collective():
    from pagedkv.model.nccl_collective import NcclCollective, nccl_status, unique_id

    usable, why = nccl_status()
    if not usable:
        pytest.skip(why)
    group = NcclCollective(0, 1, unique_id())
    yield group
    group.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_all_reduce_and_all_gather_of_one_rank_return_the_input(collective, dtype):
    import cupy

    from pagedkv.backend import dtype_of

    x = cupy.asarray(np.random.default_rng(0).standard_normal((5, 7)).astype(dtype_of(dtype)))
    np.testing.assert_array_equal(cupy.asnumpy(collective.all_reduce(x)), cupy.asnumpy(x))
    np.testing.assert_array_equal(cupy.asnumpy(collective.all_gather(x)), cupy.asnumpy(x))


def test_collectives_are_captured_in_a_cuda_graph(collective):
    import cupy

    x = cupy.asarray(np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        collective.all_reduce(x)  # warm-up outside the capture
        stream.begin_capture()
        y = collective.all_reduce(x * 2)
        graph = stream.end_capture()
        x[...] = cupy.asarray(np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32))
        graph.launch(stream)
    stream.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(y), 2 * cupy.asnumpy(x), rtol=1e-6)


def test_a_rank_model_over_nccl_matches_the_unsharded_model(collective):
    import cupy

    from pagedkv.backend import get_backend
    from pagedkv.cache import KVCache
    from pagedkv.model import LlamaModel, ModelConfig, random_weights
    from pagedkv.model.llama import DecodeBatch
    from pagedkv.model.tensor_parallel import TensorParallelPlan, shard_weights

    gpu = get_backend("gpu")
    cfg = ModelConfig(vocab_size=250, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                      intermediate_size=96, max_position_embeddings=256)
    weights = random_weights(cfg, seed=1, dtype="float32", device="gpu")
    plan = TensorParallelPlan(cfg, 1, 0)
    models = [LlamaModel(cfg, weights, gpu, fused=False),
              LlamaModel(plan.local_config(), shard_weights(weights, plan, cupy), gpu, fused=False, parallel=plan,
                         collective=collective)]
    outs = []
    for model in models:
        cache = KVCache(2, 8, 16, 2, 32, "float32", "gpu")
        cache.k_pool[...] = 0
        cache.v_pool[...] = 0
        batch = DecodeBatch(token_ids=cupy.asarray([3, 249], dtype=cupy.int64),
                            positions=cupy.asarray([0, 0], dtype=cupy.int64),
                            slot_mapping=cupy.asarray([0, 16], dtype=cupy.int64),
                            block_tables=cupy.asarray([[0], [1]], dtype=cupy.int32),
                            context_lens=cupy.asarray([1, 1], dtype=cupy.int32))
        outs.append(cupy.asnumpy(model.decode(batch, cache)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_engine_with_two_ranks_on_one_gpu_gives_the_one_rank_tokens_in_float32():
    """Issue 22's identity target (64 prompts x 64 tokens, greedy, float32) on the one GPU this project is lent:
    both ranks as threads on the same device (NOTE: a check of the sharded engine on the GPU, not a speed-up)."""
    from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
    from pagedkv.model import ModelConfig, random_weights

    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=32,
                      intermediate_size=512, max_position_embeddings=512)
    weights = random_weights(cfg, seed=2, dtype="float32", device="gpu")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, int(rng.integers(4, 64))).tolist() for _ in range(64)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = []
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model=cfg, dtype="float32", device="gpu", num_blocks=1024, max_num_seqs=64,
                                        cuda_graph=False, tensor_parallel_size=tp), model_config=cfg, weights=weights)
        outs.append([o.outputs[0].token_ids for o in engine.generate(prompts, params, progress=False)])
    assert outs[1] == outs[0]
