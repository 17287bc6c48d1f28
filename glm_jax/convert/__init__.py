"""Checkpoint conversion: MHA -> GQA/MQA (uptrain.py)."""
