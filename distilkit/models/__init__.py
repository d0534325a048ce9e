"""Models: loading teachers and students, their output heads, sharding, sampling, and checkpoints' models."""

from distilkit.models.checkpoint import load_model_and_tokenizer, model_from_checkpoint, read_checkpoint
from distilkit.models.heads import BodyOutput, OutputHead, body_features, check_head, output_head
from distilkit.models.loading import ModelSpec, load_causal_lm, shared_vocab_size

__all__ = [
    "BodyOutput",
    "ModelSpec",
    "OutputHead",
    "body_features",
    "check_head",
    "load_causal_lm",
    "load_model_and_tokenizer",
    "model_from_checkpoint",
    "output_head",
    "read_checkpoint",
    "shared_vocab_size",
]
