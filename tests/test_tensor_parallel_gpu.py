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
    from pagedkv.kv_cache import KVCache
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
