"""Inference: the KV cache, prefill + compiled decode loop, GLM blank filling, sampling."""
