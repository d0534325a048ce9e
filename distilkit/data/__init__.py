"""Data: text and chat sources, tokenizers, the built-in corpora, packing into blocks, a resumable sampler."""

from distilkit.data.chat_blocks import ChatBlocks, PackingReport
from distilkit.data.sampler import ResumableSampler
from distilkit.data.text import PackedBlocks, TextDataModule, held_out_split
from distilkit.data.tokenizer import resolve_tokenizer, train_bpe

__all__ = [
    "ChatBlocks",
    "PackedBlocks",
    "PackingReport",
    "ResumableSampler",
    "TextDataModule",
    "held_out_split",
    "resolve_tokenizer",
    "train_bpe",
]
