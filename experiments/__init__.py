"""pagedkv's experiments: ``python -m experiments.NAME`` in a checkout, ``python -m pagedkv.experiments.NAME``
anywhere once installed (memory_share, throughput, engine_bench, profile_engine, kernel_bench, plots).

Each prints a table and writes files only where asked (``--output-json``, ``--plot``). Shared flag handling,
memory estimates and output checks live in :mod:`.cli`; modules import each other relatively."""
