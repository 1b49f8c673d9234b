"""Inference: autoregressive multi-interest recall (RecGPT's generation-based top-K)."""
