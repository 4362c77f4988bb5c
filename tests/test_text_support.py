"""Helpers of the text and serving tests (no tests here): a tiny random checkpoint with a tokenizer trained on
the spot, and a FakeEngine that keeps the LLMEngine contract in miniature (for the engine loop's failure paths)."""
import json
from pathlib import Path

import numpy as np

from pagedkv.engine import SamplingParams
from pagedkv.engine.request import CompletionOutput, RequestOutput
from pagedkv.model import get_config, random_weights
from pagedkv.model.safetensors import save_file

VOCAB = 512


def hf_tensors(config, weights) -> dict:
    """Our fused ``[in, out]`` weights as Hugging Face ``[out, in]`` float32 tensors with HF names."""
    nq, nkv, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    t = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = weights.lm_head.T
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = lw.input_norm, lw.post_norm
        for name, (a, b) in zip("qkv", ((0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv))):
            t[p + f"self_attn.{name}_proj.weight"] = lw.wqkv[:, a:b].T
        t[p + "self_attn.o_proj.weight"] = lw.wo.T
        t[p + "mlp.gate_proj.weight"] = lw.w_gate_up[:, :inter].T
        t[p + "mlp.up_proj.weight"] = lw.w_gate_up[:, inter:].T
        t[p + "mlp.down_proj.weight"] = lw.w_down.T
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in t.items()}


def write_checkpoint(folder: Path, *, max_positions: int = 512, generation: dict | None = None) -> Path:
    """A tiny Llama checkpoint (random float32 weights, vocab 512) + a trained tokenizer with a chat template."""
    from pagedkv.text.train import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(folder, VOCAB)
    config = get_config("tiny", vocab_size=VOCAB, max_position_embeddings=max_positions)
    weights = random_weights(config, seed=0, dtype="float32", device="cpu")
    save_file(hf_tensors(config, weights), folder / "model.safetensors")
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
          "vocab_size": VOCAB, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
          "tie_word_embeddings": False, "max_position_embeddings": max_positions, "torch_dtype": "float32",
          "eos_token_id": tok.eos_token_id}
    (folder / "config.json").write_text(json.dumps(hf))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


class FakeEngine:
    """check_request / add_request / abort_request / step / has_unfinished_requests, as LLMEngine promises them.

    Each branch emits one token per step from its own seeded generator; text through the real detokenizer.
    ``fail_steps`` makes the next that many steps raise. ``num_free_blocks`` counts what would be held.
    """

    def __init__(self, tokenizer, *, max_model_len=256, num_blocks=64, block_size=16, max_num_seqs=16):
        from pagedkv.text import IncrementalDetokenizer

        self.detokenizer_cls = IncrementalDetokenizer
        self.tokenizer, self.max_model_len, self.max_num_seqs = tokenizer, max_model_len, max_num_seqs
        self.num_blocks, self.block_size = num_blocks, block_size
        self.requests: dict[int, dict] = {}
        self.next_id, self.fail_steps, self.num_steps = 0, 0, 0

    def check_request(self, prompt, params: SamplingParams):
        if any(not 0 <= t < VOCAB for t in prompt):
            raise ValueError(f"prompt token outside the vocabulary [0, {VOCAB})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt + max_tokens exceeds max_model_len={self.max_model_len}")
        if params.n > self.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.max_num_seqs}")

    def add_request(self, prompt_token_ids, params=None, *, request_id=None, prompt=None):
        params, prompt = params or SamplingParams(), prompt_token_ids
        self.check_request(prompt, params)
        rid, self.next_id = (self.next_id if request_id is None else request_id), self.next_id + 1
        branches = [dict(ids=[], finish=None, stop=None, rng=np.random.default_rng(params.branch_seed(i)),
                         detok=self.detokenizer_cls(self.tokenizer, prompt, params)) for i in range(params.n)]
        self.requests[rid] = dict(prompt=list(prompt), params=params, branches=branches)
        return rid

    def _output(self, rid, finished) -> RequestOutput:
        r = self.requests[rid]
        outs = [CompletionOutput(i, list(b["ids"]), b["finish"], b["detok"].text,
                                 [{t: -1.0} for t in b["ids"]] if r["params"].logprobs is not None else None,
                                 None, b["stop"]) for i, b in enumerate(r["branches"])]
        return RequestOutput(rid, r["prompt"], outs, finished)

    def abort_request(self, rid):
        if rid not in self.requests:
            return None
        for b in self.requests[rid]["branches"]:
            b["finish"] = b["finish"] or "abort"
        out = self._output(rid, True)
        del self.requests[rid]
        return out

    def has_unfinished_requests(self):
        return bool(self.requests)

    @property
    def num_free_blocks(self):
        used = sum(-(-(len(r["prompt"]) + len(b["ids"])) // self.block_size)
                   for r in self.requests.values() for b in r["branches"] if b["finish"] is None)
        return self.num_blocks - used

    def step(self):
        """One token per running branch; an injected failure aborts every request (as a failed forward does to
        the requests it scheduled) and reports them with the next step."""
        self.num_steps += 1
        if self.fail_steps:
            self.fail_steps -= 1
            for r in self.requests.values():
                for b in r["branches"]:
                    b["finish"] = b["finish"] or "abort"
            raise RuntimeError("injected step failure")
        outputs = []
        for rid in list(self.requests):
            r = self.requests[rid]
            for b in r["branches"]:
                if b["finish"] is None:
                    self._advance(b, r["params"])
            finished = all(b["finish"] is not None for b in r["branches"])
            outputs.append(self._output(rid, finished))
            if finished:
                del self.requests[rid]
        return outputs

    def _advance(self, b, params):
        token = int(b["rng"].integers(3, VOCAB))
        b["ids"].append(token)
        stop = b["detok"].update([token])
        if stop is not None:
            b["finish"], b["stop"] = "stop", stop
        elif len(b["ids"]) >= params.max_tokens:
            b["finish"] = "length"
        if b["finish"] is not None:
            b["detok"].finish()


class LiveServer:
    """uvicorn serving ``app`` in a thread on a free port of 127.0.0.1 (``.url`` ends in /v1)."""

    def __init__(self, app):
        import threading
        import time

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + "/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
