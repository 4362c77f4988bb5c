"""pagedkv's experiments: ``pagedkv bench NAME`` (the console script), ``python -m pagedkv.experiments.MODULE``
from any folder once installed, ``python -m experiments.MODULE`` in a checkout. Each runnable module has ``--help``.

Each prints a table and writes files only where asked (``--output-json``, ``--plot``). Shared flag handling,
memory estimates and output checks live in :mod:`.cli`; modules import each other relatively.
"""

# NOTE: the one list of runnable experiments: ``pagedkv bench NAME`` -> (module, summary); the console script,
# its help and the tests iterate it; the other modules here are libraries of these
BENCHMARKS = {
    "throughput": ("throughput", "static vs continuous batching under one KV budget"),
    "latency": ("engine_bench", "workload W1 through LLMEngine, the decode step at full batch"),
    "serve": ("serve_bench", "an OpenAI-compatible server (or the engine in-process) under load"),
    "kernels": ("kernel_bench", "decode attention kernels against the read ceiling"),
    "prefill": ("prefill_bench", "prefill attention vs torch SDPA, engine TTFT vs transformers"),
    "ttft": ("ttft_breakdown", "engine time to first token split into GEMMs, attention, the rest, host"),
    "memory": ("memory_share", "KV memory of naive copies vs shared, forked prompts (+ beams)"),
    "beams": ("memory_beam", "KV blocks of beam search, shared vs copied"),
    "cascade": ("cascade_bench", "cascade attention's kernels vs plain decode and the read ceiling"),
    "prefix": ("prefix_workloads", "prefix caching and chunked prefill on vs off"),
    "profile": ("profile_engine", "cProfile of a continuous-batching run"),
    "sampler": ("sampler_bench", "the device sampler vs cupy.argmax"),
    "structured": ("structured_bench", "decode throughput with a JSON schema vs without (llguidance)"),
    "agreement": ("fp16_agreement", "engine variants' greedy tokens vs the eager reference (float16)"),
    "fp8": ("fp8_accuracy", "fp8 KV cache vs the model-dtype cache: greedy agreement, next-token KL"),
    "cpu": ("cpu_demo", "LLM('small') on the CPU: first token, tokens/s, float32 vs float64 matmuls"),
    "plots": ("plots", "PNGs from the JSON results"),
}
