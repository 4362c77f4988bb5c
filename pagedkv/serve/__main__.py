"""``python -m pagedkv.serve [MODEL | --model MODEL] ...``: the same as ``pagedkv serve`` (:mod:`pagedkv.serve.cli`)."""
import sys

from .cli import main

sys.exit(main(prog="python -m pagedkv.serve"))
