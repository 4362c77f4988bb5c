"""The inference engine: sampling, requests, continuous/static scheduling with preemption, LLMEngine."""
from .config import EngineConfig
from .engine import LLMEngine
from .metrics import EngineMetrics, StepMetrics
from .request import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["CompletionOutput", "EngineConfig", "EngineMetrics", "LLMEngine", "RequestOutput", "SamplingParams",
           "Scheduler", "SchedulerConfig", "StepMetrics"]
