"""The shared vocabulary of two tokenizers: tokens paired by the bytes they stand for."""

from __future__ import annotations

import pytest
import torch
from helpers import TEACHER, sentencepiece_tokenizer
from transformers import AutoTokenizer

from distilkit.data.corpus import _python_reference
from distilkit.data.token_bytes import token_bytes
from distilkit.data.vocabulary import VocabularyMap, shared_vocabulary


@pytest.fixture(scope="module")
def own():
    return AutoTokenizer.from_pretrained(TEACHER)


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_tokenizer([doc["text"] for doc in _python_reference()[:40]])


def test_tokens_are_paired_by_their_bytes(own, sp) -> None:
    """``Ġthe`` (byte-level) and ``▁the`` (SentencePiece) are one token, the byte ``ð`` and the byte-fallback
    ``<0xF0>`` too; every pair stands for the same bytes and no id is used twice."""
    mapping = shared_vocabulary(own, sp)
    pairs = dict(zip(mapping.student_ids.tolist(), mapping.teacher_ids.tolist(), strict=True))
    own_vocab, sp_vocab = own.get_vocab(), sp.get_vocab()
    assert pairs[own_vocab["Ġthe"]] == sp_vocab["▁the"]
    assert pairs[own_vocab["Ċ"]] == sp_vocab["\n"]  # the newline is an ordinary piece here
    assert pairs[own_vocab["ð"]] == sp_vocab["<0xF0>"]  # the lead byte of an emoji: only byte fallback
    assert pairs[own_vocab["Ġ"]] == sp_vocab["▁"]  # not <0x20>: the ordinary piece is kept
    assert pairs[own.eos_token_id] == sp.eos_token_id  # special tokens by role
    own_bytes, sp_bytes = token_bytes(own), token_bytes(sp)
    for student_id, teacher_id in pairs.items():
        if student_id != own.eos_token_id:
            assert own_bytes.pieces[student_id] == sp_bytes.pieces[teacher_id]
    assert len(set(pairs.values())) == len(pairs)
    assert (mapping.student_size, mapping.teacher_size) == (len(own), len(sp))
    assert 200 < mapping.shared < len(sp)


def test_same_tokenizer_shares_everything(own) -> None:
    mapping = shared_vocabulary(own, own)
    assert mapping.shared == len(own)
    assert torch.equal(mapping.student_ids, mapping.teacher_ids)
    assert mapping.fingerprint() == shared_vocabulary(own, own).fingerprint()


def test_mapping_refuses_what_is_not_one_to_one() -> None:
    with pytest.raises(ValueError, match="same length"):
        VocabularyMap(torch.arange(3), torch.arange(2), 5, 5)
    with pytest.raises(ValueError, match=r"teacher_ids must lie in \[0, 4\)"):
        VocabularyMap(torch.arange(3), torch.tensor([0, 1, 4]), 5, 4)
    with pytest.raises(ValueError, match="must not repeat"):
        VocabularyMap(torch.arange(3), torch.tensor([0, 1, 1]), 5, 5)
