"""The model runner: persistent per-sequence tables, one step's packed inputs and layout, CUDA graphs, device
sampling and logprobs. It reads block ids from the scheduler's step plan, never from the manager."""
