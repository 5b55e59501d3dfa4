"""The benchmark harness: LoRS against the baselines on layer and model workloads."""
