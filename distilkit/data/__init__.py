"""Data: text sources, tokenizers, the built-in corpora, packing into blocks and a resumable sampler."""

from distilkit.data.sampler import ResumableSampler
from distilkit.data.text import PackedBlocks, TextDataModule, held_out_split
from distilkit.data.tokenizer import resolve_tokenizer, train_bpe

__all__ = [
    "PackedBlocks",
    "ResumableSampler",
    "TextDataModule",
    "held_out_split",
    "resolve_tokenizer",
    "train_bpe",
]
