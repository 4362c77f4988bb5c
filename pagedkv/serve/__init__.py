"""An OpenAI-compatible HTTP server over the engine: ``python -m pagedkv.serve --model DIR``.

Needs the ``[serve]`` extra (FastAPI, uvicorn) for the HTTP part; :class:`EngineLoop` (the thread that owns
the engine) works without it.
"""
from .engine_loop import EngineError, EngineLoop, Sink

__all__ = ["EngineError", "EngineLoop", "Sink"]
