"""The server's engine loop: :class:`~pagedkv.engine.async_llm.AsyncLLM` (one thread owns the engine; asyncio
handlers reach it through queues). ``EngineLoop`` is its older name, kept for callers of ``submit``."""
from ..engine.async_llm import AsyncLLM, EngineError, Sink

EngineLoop = AsyncLLM

__all__ = ["AsyncLLM", "EngineError", "EngineLoop", "Sink"]
