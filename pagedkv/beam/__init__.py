"""Beam search over the engine's model and paged cache: beams share their blocks (fork, copy-on-write)."""
