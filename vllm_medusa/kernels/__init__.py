"""Attention and KV-cache kernels for Medusa tree verification."""
