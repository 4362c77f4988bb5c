"""The inference engine: sampling, requests, scheduling (continuous or static, chunked prefill), the model runner
and LLMEngine, the request loop."""
from ..sampling_params import SamplingParams
from .beam_search import BeamSearchOutput, BeamSearchParams, BeamSequence, beam_search
from .config import EngineConfig
from .engine import LLMEngine
from .metrics import EngineMetrics, StepMetrics
from .request import CompletionOutput, RequestMetrics, RequestOutput
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSequence", "CompletionOutput", "EngineConfig", "EngineMetrics", "LLMEngine", "RequestMetrics", "RequestOutput",
           "SamplingParams", "Scheduler", "SchedulerConfig", "StepMetrics", "beam_search"]
