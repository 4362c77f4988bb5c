"""Everything that launches ``kernels_cu/``, and the float64 oracles the launches are checked against.

``ops`` is the API that users and the engine call (validate, then the GPU launcher or the host reference);
``compile`` is the one door to the CUDA sources; ``decode`` / ``decode_plan``, ``prefill``, ``cache_ops``
and ``norm`` are the thin launchers; ``reference`` holds every float64 oracle.
"""
