"""pagedkv's experiments: ``python -m experiments.NAME`` in a checkout, ``python -m pagedkv.experiments.NAME``
from any folder once installed (every module here but ``cli``; each has ``--help``).

Each prints a table and writes files only where asked (``--output-json``, ``--plot``). Shared flag handling,
memory estimates and output checks live in :mod:`.cli`; modules import each other relatively."""
