"""Training: the loop (loop.py), the pure train step (step.py), TrainState and its shardings
(state.py), analytic FLOPs / MFU (flops.py), the run's logger (log.py) and the TPU preflight
compile (preflight.py)."""
