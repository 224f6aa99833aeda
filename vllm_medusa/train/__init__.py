"""Medusa-1 head training by self-distillation, for any local HF model (``python -m vllm_medusa.train``).

Stages, one module each: ``distill`` (the model's own answers, with vLLM), ``features`` (frozen
backbone hidden states, cached once), ``trainer`` (heads on cached features), ``evaluate``
(MT-Bench accuracies -> ``tree.json``), ``report`` (TRAINING.md). Importing this package does not
import vLLM.
"""

from .trainer import TrainConfig, TrainResult, train_and_save, train_heads

__all__ = ["TrainConfig", "TrainResult", "train_and_save", "train_heads"]
