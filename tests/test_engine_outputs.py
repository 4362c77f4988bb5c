"""What outputs carry: text and stop strings through the tokenizer hook (a fake detokenizer), logprobs and prompt
logprobs (against a dense float64-free recompute), and an engine built from a checkpoint folder."""
import json
import sys
import types

import numpy as np
import pytest
from test_model import dense_forward

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.kernels.reference import log_softmax
from pagedkv.model import get_config, random_weights
from pagedkv.model.safetensors import save_file


def engine(**kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return LLMEngine(EngineConfig(**kwargs))


# -- the tokenizer hook ------------------------------------------------------------------------------------
class FakeTokenizer:
    """Token ``t`` is the two letters ``ab``-``zz`` of ``t`` in base 26."""

    @staticmethod
    def piece(t: int) -> str:
        return chr(97 + t // 26 % 26) + chr(97 + t % 26)


class FakeDetokenizer:
    instances: list = []

    def __init__(self, tokenizer, prompt_token_ids, params):
        self.tokenizer, self.stop, self.text = tokenizer, params.stop, ""
        self.prompt = list(prompt_token_ids)
        self.finished = False
        FakeDetokenizer.instances.append(self)

    def update(self, new_token_ids):
        assert not self.finished
        self.text += "".join(self.tokenizer.piece(t) for t in new_token_ids)
        for s in self.stop:
            if s in self.text:
                self.text, self.finished = self.text[:self.text.index(s)], True
                return s
        return None

    def finish(self):
        self.finished = True
        return None


@pytest.fixture
def fake_detokenizer(monkeypatch):
    FakeDetokenizer.instances = []
    module = types.ModuleType("pagedkv.text.detokenizer")
    module.IncrementalDetokenizer = FakeDetokenizer
    if "pagedkv.text" not in sys.modules:
        try:
            import pagedkv.text  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "pagedkv.text", types.ModuleType("pagedkv.text"))
    monkeypatch.setitem(sys.modules, "pagedkv.text.detokenizer", module)
    return FakeDetokenizer


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        engine().add_request([1, 2], SamplingParams(stop=["ab"]))


def test_text_and_stop_strings_through_the_detokenizer_hook(fake_detokenizer):
    prompt, greedy = [1, 2, 3], dict(temperature=0, max_tokens=10)
    plain = engine().generate([prompt], SamplingParams(**greedy), progress=False)[0].outputs[0]
    assert plain.text == ""
    eng = engine()
    eng.tokenizer = FakeTokenizer()
    full = eng.generate([prompt], SamplingParams(**greedy), progress=False)[0].outputs[0]
    assert full.token_ids == plain.token_ids
    assert full.text == "".join(FakeTokenizer.piece(t) for t in plain.token_ids)
    assert all(d.finished for d in fake_detokenizer.instances) and fake_detokenizer.instances[0].prompt == prompt
    stop = FakeTokenizer.piece(plain.token_ids[3]) + FakeTokenizer.piece(plain.token_ids[4])
    out = eng.generate([prompt], SamplingParams(**greedy, stop=[stop]), progress=False)[0].outputs[0]
    first = full.text.index(stop) // 2  # the token where the stop string starts
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == plain.token_ids[:first + 2] and out.text == full.text[:2 * first]
    assert not eng.requests and eng.manager.block_manager.num_free_blocks == 256


def test_each_branch_has_its_own_detokenizer_and_abort_flushes_it(fake_detokenizer):
    eng = LLMEngine(EngineConfig(device="cpu", block_size=4, num_blocks=64), tokenizer=FakeTokenizer())
    rid = eng.add_request([5, 6], SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=30))
    for _ in range(3):
        eng.step()
    out = eng.abort_request(rid)
    assert len(fake_detokenizer.instances) == 3 and all(d.finished for d in fake_detokenizer.instances)
    assert [c.text for c in out.outputs] == ["".join(FakeTokenizer.piece(t) for t in c.token_ids)
                                            for c in out.outputs]


# -- logprobs --------------------------------------------------------------------------------------------
def test_logprobs_of_sampled_tokens_match_a_dense_recompute():
    config = get_config("tiny")
    weights = random_weights(config, seed=0, dtype="float32", device="cpu")
    eng = LLMEngine(EngineConfig(device="cpu", block_size=4, num_blocks=64), model_config=config, weights=weights)
    prompt = [3, 1, 4, 1, 5]
    out = eng.generate([prompt], SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=5, logprobs=3),
                       progress=False)[0]
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 5
        want = log_softmax(dense_forward(config, weights, prompt + c.token_ids)[len(prompt) - 1:-1])
        total = 0.0
        for i, (t, entries) in enumerate(zip(c.token_ids, c.logprobs)):
            top = np.argsort(-want[i])[:3]
            assert set(top.tolist()) <= set(entries) and t in entries and len(entries) <= 4
            for tok, lp in entries.items():
                assert lp == pytest.approx(want[i][tok], abs=1e-4)
            total += entries[t]
        assert c.cumulative_logprob == pytest.approx(total)
    none = eng.generate([prompt], SamplingParams(max_tokens=2), progress=False)[0].outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None


@pytest.mark.parametrize("budget", [64, 3])  # whole prompt, or chunks of 3
def test_prompt_logprobs_match_a_dense_recompute(budget):
    config = get_config("tiny")
    weights = random_weights(config, seed=0, dtype="float32", device="cpu")
    eng = LLMEngine(EngineConfig(device="cpu", block_size=4, num_blocks=64, max_num_seqs=2,
                                 max_num_batched_tokens=budget), model_config=config, weights=weights)
    prompt = [9, 8, 7, 6, 5, 4, 3, 2]
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2), progress=False)[0]
    want = log_softmax(dense_forward(config, weights, prompt))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entries = out.prompt_logprobs[i]
        assert prompt[i] in entries and len(entries) <= 3
        assert entries[prompt[i]] == pytest.approx(want[i - 1][prompt[i]], abs=1e-4)


# -- from_checkpoint -------------------------------------------------------------------------------------
def write_checkpoint(folder, config, weights, *, torch_dtype="float32", eos=None, generation=None):
    """A Hugging Face Llama folder (config.json, one safetensors file) holding ``weights``."""
    c = config
    nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    t = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm,
         "lm_head.weight": weights.lm_head.T}
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        q, k, v = lw.wqkv[:, :nq], lw.wqkv[:, nq:nq + nkv], lw.wqkv[:, nq + nkv:]
        inter = c.intermediate_size
        t.update({p + "input_layernorm.weight": lw.input_norm, p + "post_attention_layernorm.weight": lw.post_norm,
                  p + "self_attn.q_proj.weight": q.T, p + "self_attn.k_proj.weight": k.T,
                  p + "self_attn.v_proj.weight": v.T, p + "self_attn.o_proj.weight": lw.wo.T,
                  p + "mlp.gate_proj.weight": lw.w_gate_up[:, :inter].T,
                  p + "mlp.up_proj.weight": lw.w_gate_up[:, inter:].T, p + "mlp.down_proj.weight": lw.w_down.T})
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, folder / "model.safetensors")
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
          "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
          "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": False,
          "max_position_embeddings": c.max_position_embeddings, "torch_dtype": torch_dtype}
    if eos is not None:
        hf["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(hf))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))


def test_from_checkpoint_takes_dtype_eos_ids_and_lengths_from_the_folder(tmp_path):
    config = get_config("tiny", max_position_embeddings=96)
    weights = random_weights(config, seed=5, dtype="float32", device="cpu")
    write_checkpoint(tmp_path, config, weights, torch_dtype="bfloat16", eos=7,
                     generation={"eos_token_id": [7, 9], "temperature": 0.6, "top_p": 0.9})
    eng = LLMEngine.from_checkpoint(tmp_path, EngineConfig(device="cpu", block_size=4, num_blocks=64))
    assert str(eng.model.dtype) == "bfloat16" and eng.eos_token_ids == frozenset({7, 9})
    assert eng.max_model_len == 96  # the model's positions (the pool holds 256 tokens)
    small = LLMEngine.from_checkpoint(tmp_path, EngineConfig(device="cpu", block_size=4, num_blocks=10,
                                                             eos_token_id=3))
    assert small.max_model_len == 40 and small.eos_token_ids == frozenset({3})  # bounded by the pool; explicit eos
    try:
        import pagedkv.model.generation_config  # noqa: F401
    except ImportError:
        pass  # the loader's reader of generation defaults is not in this tree: only EOS ids are read
    else:
        assert (eng.default_params.temperature, eng.default_params.top_p) == (0.6, 0.9)


def test_from_checkpoint_generates_what_the_same_weights_generate(tmp_path):
    config = get_config("tiny")
    weights = random_weights(config, seed=6, dtype="float32", device="cpu")
    write_checkpoint(tmp_path, config, weights)
    kwargs = dict(device="cpu", block_size=4, num_blocks=64, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLMEngine.from_checkpoint(tmp_path, EngineConfig(**kwargs)).generate([[1, 2, 3]], params, progress=False)
    b = LLMEngine(EngineConfig(**kwargs), model_config=config, weights=weights).generate([[1, 2, 3]], params,
                                                                                          progress=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
