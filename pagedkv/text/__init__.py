"""Text in, text out: the checkpoint's tokenizer, its chat template and incremental detokenization.

Needs the ``[text]`` extra (``tokenizers``, ``jinja2``) only when a tokenizer is loaded or a template rendered:
importing this package works without them.
"""
from .chat_template import render_chat_template
from .detokenizer import IncrementalDetokenizer
from .tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "render_chat_template"]
