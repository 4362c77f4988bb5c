"""Which requests run and which blocks they get: the scheduler, its continuous / static policy, the prefix
cache index, and the step plan it hands the model runner (block ids travel in it)."""
