"""The small GPU engine the engine's GPU tests share (no torch needed: the runner's tests import it too); its
model, configurations and prompts are the ones ``experiments.fp16_agreement`` counts agreement over."""
from experiments.fp16_agreement import GPU_MODEL, REFERENCE, VARIANTS, shared_prompts, small_engine

__all__ = ["GPU_MODEL", "REFERENCE", "VARIANTS", "_gpu_engine", "_shared_prompts"]


def _gpu_engine(dtype, **overrides):
    return small_engine(dtype, "gpu", **overrides)


_shared_prompts = shared_prompts
