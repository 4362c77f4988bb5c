"""An OpenAI-compatible HTTP server over the engine: ``pagedkv serve MODEL`` (or ``python -m pagedkv.serve``).

Needs the ``[serve]`` extra (FastAPI, uvicorn, prometheus_client) for the HTTP part; the engine loop
(:class:`~pagedkv.engine.async_llm.AsyncLLM`, the thread that owns the engine) works without it.
"""
from .engine_loop import AsyncLLM, EngineError, EngineLoop, Sink

__all__ = ["AsyncLLM", "EngineError", "EngineLoop", "Sink"]
