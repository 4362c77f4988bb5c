"""The small GPU engine the engine's GPU tests share (no torch needed: the runner's tests import it too)."""
import numpy as np

from pagedkv.engine import EngineConfig, LLMEngine

GPU_MODEL = dict(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                 intermediate_size=512, max_position_embeddings=512)
REFERENCE = dict(enable_prefix_caching=False, enable_chunked_prefill=False, cuda_graph=False,
                 max_num_batched_tokens=4096, async_scheduling=False)
VARIANTS = {
    "chunked": dict(max_num_batched_tokens=48),
    "cached": dict(enable_chunked_prefill=False, max_num_batched_tokens=4096),
    "graphs": dict(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=4096,
                   cuda_graph=True),
    "all": dict(max_num_batched_tokens=48, cuda_graph=True),
    "all-preempting": dict(max_num_batched_tokens=48, cuda_graph=True, num_blocks=40, watermark=0.0),
    "all-sync": dict(max_num_batched_tokens=48, cuda_graph=True, async_scheduling=False),
    "eager-sampler": dict(max_num_batched_tokens=48),  # asynchronous, no graphs: eager forward + sampler
}


def _gpu_engine(dtype, **overrides):
    from pagedkv.model import ModelConfig

    kwargs = dict(model=ModelConfig(**GPU_MODEL), device="gpu", dtype=dtype, block_size=16, num_blocks=256,
                  max_num_seqs=16, max_model_len=320, seed=0)
    return LLMEngine(EngineConfig(**{**kwargs, **overrides}))


def _shared_prompts(num=12, seed=0):
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, 512, 160).tolist()
    return [doc[:int(rng.choice([0, 40, 100, 160]))] + rng.integers(0, 512, int(rng.integers(1, 60))).tolist()
            for _ in range(num)]
