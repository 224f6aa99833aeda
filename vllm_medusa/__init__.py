"""Medusa tree speculative decoding for vLLM."""
