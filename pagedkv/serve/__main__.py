"""``python -m pagedkv.serve --model DIR``: see :mod:`pagedkv.serve.cli`."""
import sys

from .cli import main

sys.exit(main())
