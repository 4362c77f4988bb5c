"""The inference engine: LLMEngine (the request loop: add / abort / step / outputs), requests and their outputs;
``sched/`` decides which requests run and which blocks they get (continuous or static, chunked prefill, prefix
caching) and hands the model runner a step plan; ``runner/`` turns the plan into one forward and samples.
Beam search (``pagedkv.beam``) is re-exported here as part of the engine's public face."""
from ..sampling_params import SamplingParams
from ..beam.search import BeamSearchOutput, BeamSearchParams, BeamSequence, beam_search
from ..structured_params import GuidedDecodingParams, StructuredOutputsParams
from .config import EngineConfig
from .engine import LLMEngine
from .metrics import EngineMetrics, StepMetrics
from .request import CompletionOutput, RequestMetrics, RequestOutput
from .sched.scheduler import Scheduler, SchedulerConfig

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSequence", "CompletionOutput", "EngineConfig", "EngineMetrics", "LLMEngine", "RequestMetrics", "RequestOutput",
           "GuidedDecodingParams", "SamplingParams", "Scheduler", "SchedulerConfig", "StepMetrics",
           "StructuredOutputsParams", "beam_search"]
