"""The ARC code-induction workload: the model writes `transform`, the reward runs it on the grids."""
