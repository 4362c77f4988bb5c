"""The inference engine: sampling, requests, scheduling (continuous or static, chunked prefill), the model runner
and LLMEngine, the request loop."""
from .config import EngineConfig
from .engine import LLMEngine
from .metrics import EngineMetrics, StepMetrics
from .request import CompletionOutput, RequestMetrics, RequestOutput
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["CompletionOutput", "EngineConfig", "EngineMetrics", "LLMEngine", "RequestMetrics", "RequestOutput",
           "SamplingParams", "Scheduler", "SchedulerConfig", "StepMetrics"]
