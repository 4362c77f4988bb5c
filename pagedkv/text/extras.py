"""Optional dependencies: imported when first needed, with an error that names the extra to install."""
from __future__ import annotations

import importlib

EXTRAS = {"tokenizers": "text", "jinja2": "text", "fastapi": "serve", "uvicorn": "serve", "httpx": "serve",
          "prometheus_client": "serve"}


def require(module: str, purpose: str):
    """Import ``module`` or raise ``ImportError`` saying which ``pagedkv[extra]`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0], "text")
        raise ImportError(f"{purpose} needs the '{module.split('.')[0]}' package: "
                          f"pip install 'pagedkv[{extra}]'") from exc
