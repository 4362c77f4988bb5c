"""GPU parity: random-weight LlamaForCausalLM / Qwen2ForCausalLM from transformers, saved with
``save_pretrained`` and loaded through pagedkv's loader, give transformers' own greedy tokens (float32); the
engine's variants (chunking, caching, CUDA graphs, asynchronous scheduling) give the synchronous eager
reference's tokens.

The engine decodes the prompts as one batch (different lengths, continuous batching); transformers'
``generate`` runs each prompt alone (no padding), the trusted reference.
"""
import numpy as np
import pytest

from engine_gpu_support import GPU_MODEL, REFERENCE, VARIANTS, _gpu_engine, _shared_prompts  # noqa: F401
from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_NEW_TOKENS = 24
PROMPT_LENS = (5, 17, 40, 64, 3)


def _hf_model(arch: str):
    torch.manual_seed(0)
    common = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=arch == "qwen2", initializer_range=0.05)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "llama3-rope":
        model = transformers.LlamaForCausalLM(_llama3_config(common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():  # biases and norm weights are initialised to constants: make them informative
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    return model.float().eval()


def _llama3_config(common):
    """Llama 3.x frequency scaling; the original context is short so that many frequencies change."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.LlamaConfig(**common, rope_parameters={**rope, "rope_theta": 500000.0})
    return transformers.LlamaConfig(**common, rope_scaling=rope, rope_theta=500000.0)


def _hf_greedy(model, prompt, device):
    ids = torch.tensor([prompt], device=device)
    model.generation_config.eos_token_id = None  # never stop early: the engine runs with ignore_eos
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch, cuda_graph", [("llama", False), ("qwen2", False), ("llama", True),
                                              ("llama3-rope", False)])
def test_greedy_tokens_match_transformers(tmp_path, arch, cuda_graph):
    model = _hf_model(arch)
    if arch == "llama3-rope" and getattr(model.model.rotary_emb, "rope_type", None) != "llama3":
        pytest.skip("this transformers did not take the llama3 rope configuration")
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, size=n).tolist() for n in PROMPT_LENS]
    engine = LLMEngine.from_checkpoint(tmp_path, EngineConfig(dtype="float32", device="gpu", num_blocks=128,
                                                              block_size=16, max_model_len=512,
                                                              cuda_graph=cuda_graph))
    assert engine.model.config.qkv_bias == (arch == "qwen2")
    assert (engine.model.config.rope_llama3_scaling is not None) == (arch == "llama3-rope")
    assert engine.model.fused_error is None and engine.model.gemm_error is None
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outs = engine.generate(prompts, params, progress=False)
    assert engine.graph_error is None
    assert (engine.graphs is not None) == cuda_graph
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    for prompt, out in zip(prompts, outs):
        want = _hf_greedy(model, prompt, device)
        assert len(want) > 0
        assert out.outputs[0].token_ids[:len(want)] == want, f"prompt of {len(prompt)} tokens"


# -- issue 10 on the device: chunked prefill, prefix caching and CUDA graphs give the reference's tokens ------





def _run_twice(engine, prompts, params):
    """Each prompt set twice (the second pass mostly from the prefix cache); token ids of every branch."""
    first = engine.generate(prompts, params, progress=False)
    second = engine.generate(prompts, params, progress=False)
    bm = engine.manager.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.manager.seq_ids  # nothing leaked at idle
    return [[c.token_ids for c in o.outputs] for o in first + second]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunking_caching_and_graphs_give_the_reference_tokens_in_float32(variant, n):
    prompts = _shared_prompts(seed=n)
    params = SamplingParams(n=n, temperature=0, max_tokens=24, ignore_eos=True)
    want = _run_twice(_gpu_engine("float32", **REFERENCE), prompts, params)
    engine = _gpu_engine("float32", **VARIANTS[variant])
    got = _run_twice(engine, prompts, params)
    assert engine.graph_error is None
    agree = sum(a == b for a, b in zip(got, want))
    print(f"float32 {variant} n={n}: {agree}/{len(want)} requests agree; "
          f"hit rate {engine.metrics().prefix_cache_hit_rate:.2f}, preemptions {engine.metrics().num_preemptions}")
    assert got == want

