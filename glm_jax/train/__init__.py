"""Training: metrics (FLOPs/MFU) today; state, optimizer, step and loop arrive with the training issue."""
