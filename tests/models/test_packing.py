"""Packed rows: a sequence packed with others gives what it gives alone (features, logits, loss, metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import GPT2_TEMPLATE, THREE_TURNS, chat_tokenizer, tiny_trainer, write_jsonl
from torch import nn
from torch.utils.data import default_collate

from distilkit import DistillationModule, TextDataModule
from distilkit.batch import IGNORE_INDEX
from distilkit.errors import ConfigError
from distilkit.models import packing
from distilkit.models.heads import body_features

V = 97
CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2},
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "mistral": {
        "model_type": "mistral",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 3,
    },
}


def tiny(kind: str, attention: str = "sdpa", **extra) -> nn.Module:
    fields = {k: v for k, v in (CONFIGS.get(kind) or {}).items() if k != "model_type"} | extra
    config = transformers.AutoConfig.for_model(kind if kind in CONFIGS else "opt", vocab_size=V, **fields)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def packed_rows() -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, slice, torch.Tensor]]]:
    """Two rows of 12: [a (5), b (4), padding (3)] and [c (6), b (4), padding (2)]; each sequence with
    its row and place."""
    generator = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(1, V, (n,), generator=generator) for n in (5, 4, 6))
    rows = torch.zeros(2, 12, dtype=torch.long)
    positions = torch.zeros(2, 12, dtype=torch.long)
    places = []
    for row, parts in enumerate([(a, b), (c, b)]):
        at = 0
        for part in parts:
            rows[row, at : at + len(part)] = part
            positions[row, at : at + len(part)] = torch.arange(len(part))
            places.append((row, slice(at, at + len(part)), part))
            at += len(part)
        positions[row, at:] = torch.arange(12 - at)
    return rows, positions, places


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_a_packed_sequence_gives_what_it_gives_alone(kind, attention):
    model = tiny(kind, attention)
    ids, positions = packed_rows()[:2]
    with torch.no_grad():
        packed = body_features(
            model, ids, (ids != 0).long(), output_hidden_states=True, position_ids=positions
        )
        for row, place, sequence in packed_rows()[2]:
            alone = body_features(model, sequence[None], output_hidden_states=True)
            torch.testing.assert_close(packed.last[row, place], alone.last[0], rtol=1e-5, atol=1e-5)
            for packed_layer, alone_layer in zip(packed.hidden_states, alone.hidden_states, strict=True):
                torch.testing.assert_close(packed_layer[row, place], alone_layer[0], rtol=1e-5, atol=1e-5)
            logits = model(input_ids=sequence[None]).logits[0]  # the model's own forward, unpacked
            head = model.get_output_embeddings()
            torch.testing.assert_close(head(packed.last[row, place]), logits, rtol=1e-5, atol=1e-5)


def test_a_two_dimensional_mask_would_attend_across_sequences():
    """Why body_features drops the 2-D mask of packed rows: with it, transformers attends across the row."""
    model = tiny("llama")
    ids, positions, places = packed_rows()
    row, place, sequence = places[1]
    with torch.no_grad():
        crossed = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions)
        alone = model.base_model(input_ids=sequence[None])
    assert not torch.allclose(crossed[0][row, place], alone[0][0], atol=1e-3)


def test_rows_laid_end_to_end_for_a_varlen_kernel_are_exact(monkeypatch):
    """The flash-attention layout, one (1, B*T) row, checked with sdpa (CPU has no flash kernel)."""
    model = tiny("llama")
    ids, positions = packed_rows()[:2]
    with torch.no_grad():
        rows = body_features(model, ids, position_ids=positions).last
        monkeypatch.setattr(packing, "uses_varlen", lambda model: True)
        seen = []
        original = model.base_model.forward
        monkeypatch.setattr(
            model.base_model, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or original(**kw)
        )
        flat = body_features(model, ids, position_ids=positions).last
    assert seen[-1] == (1, 24)
    torch.testing.assert_close(flat, rows, rtol=1e-6, atol=1e-6)


def test_a_model_that_attends_across_sequences_is_refused():
    """OPT (transformers 5.24) builds its mask without the positions: refused, not trained across."""
    model = tiny(
        "opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32
    )
    ids, positions = packed_rows()[:2]
    with pytest.raises(ConfigError, match="model='OPTForCausalLM': attends across the conversations packed"):
        body_features(model, ids, position_ids=positions)
    body_features(model, ids)  # plain rows are fine


def test_a_module_without_position_ids_is_refused():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.embed(input_ids)

    ids, positions = packed_rows()[:2]
    with pytest.raises(ConfigError, match="does not take position_ids"):
        body_features(Plain(), ids, position_ids=positions)


def test_a_model_is_checked_once(monkeypatch):
    model = tiny("gpt2")
    calls = []
    forward = packing._forward
    monkeypatch.setattr(packing, "_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    ids, positions = packed_rows()[:2]
    with torch.no_grad():
        body_features(model, ids, position_ids=positions)
        assert len(calls) == 3  # the check's two rows, then the batch
        body_features(model, ids, position_ids=positions)
    assert len(calls) == 4


# ------------------------------------------------------------------------------------------- the module
@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """Chat data of six conversations over a GPT-2 tokenizer with the recipe's template."""
    tmp = tmp_path_factory.mktemp("packed-chat")
    chat_tokenizer("gpt2", tmp / "tokenizer")
    rows = [{"messages": THREE_TURNS[: 2 * n + 1]} for n in (1, 2, 3)]
    rows += [
        {
            "messages": [
                {"role": "user", "content": f"Is {n} odd?"},
                {"role": "assistant", "content": ["No.", "Yes."][n % 2]},
            ]
        }
        for n in range(3)
    ]
    path = write_jsonl(tmp / "chat.jsonl", rows)
    data = TextDataModule(
        str(path),
        val_files=str(path),
        tokenizer=str(tmp / "tokenizer"),
        block_size=160,
        batch_size=2,
        chat_template=GPT2_TEMPLATE,
        cache_dir=str(tmp / "cache"),
    )
    data.setup()
    return data


def alone_batch(data: TextDataModule, document: int) -> dict[str, torch.Tensor]:
    """The block holding ``document``, with every other conversation's labels ignored, and the same
    conversation alone at the start of a block of its own."""
    blocks = data.datasets["val"]
    row, columns = np.nonzero(blocks.documents == document)
    item = blocks[int(row[0])]
    keep = torch.zeros_like(item["labels"], dtype=torch.bool)
    keep[columns] = True
    packed = item | {"labels": item["labels"].where(keep, IGNORE_INDEX)}
    n, length = len(columns), data.block_size
    alone = {key: torch.zeros_like(value) for key, value in item.items()}
    alone["input_ids"][:n] = item["input_ids"][columns]
    alone["attention_mask"][:n] = 1
    alone["labels"] = torch.full((length,), IGNORE_INDEX)
    alone["labels"][:n] = item["labels"][columns]
    alone["position_ids"] = torch.cat([torch.arange(n), torch.arange(length - n)])
    return {
        "packed": default_collate([packed]),
        "alone": default_collate([alone]),
        "n": n,
        "columns": columns,
    }


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_packed_conversation_gives_the_logits_and_loss_it_gives_alone(kind, chat):
    student = {k: v for k, v in CONFIGS[kind].items()} | (
        {"n_layer": 1} if kind == "gpt2" else {"num_hidden_layers": 1}
    )
    module = DistillationModule(
        student=student,
        teacher=CONFIGS[kind],
        vocab_size=chat.vocab_size,
        block_size=chat.block_size,
        eos_token_id=chat.eos_token_id,
    ).eval()
    blocks = chat.datasets["val"]
    shared = [
        d
        for d in range(6)
        if len(set(blocks.documents[np.nonzero(blocks.documents == d)[0][0]].tolist()) - {-1}) > 1
    ]
    assert shared, "some conversations share a block"
    with torch.no_grad():
        for document in shared:
            batches = alone_batch(chat, document)
            packed, alone = batches["packed"], batches["alone"]
            student = [module.student_head()(module.student_forward(b).last) for b in (packed, alone)]
            torch.testing.assert_close(
                student[0][0, batches["columns"]], student[1][0, : batches["n"]], rtol=1e-5, atol=1e-5
            )
            losses = [module.compute_loss(b) for b in (packed, alone)]
            for name in ("loss", "ce_loss", "kd_loss"):
                torch.testing.assert_close(losses[0][name], losses[1][name], rtol=1e-5, atol=1e-6)


def test_validation_perplexity_counts_the_assistants_tokens_only(chat, tmp_path):
    module = DistillationModule(
        student=CONFIGS["llama"],
        vocab_size=chat.vocab_size,
        block_size=chat.block_size,
        eos_token_id=chat.eos_token_id,
    )
    metrics = tiny_trainer(tmp_path, limit_val_batches=None).validate(module, chat, verbose=False)[0]
    model = module.student.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for document in range(6):
            blocks = chat.datasets["val"]
            row, columns = np.nonzero(blocks.documents == document)
            item = blocks[int(row[0])]
            ids, labels = item["input_ids"][columns], item["labels"][columns]
            logits = model(input_ids=ids[None]).logits[
                0, :-1
            ]  # the conversation alone, the model's own forward
            targets = labels[1:]
            keep = targets != IGNORE_INDEX
            assert keep.sum() < len(targets) // 2  # the assistant's tokens are a minority
            nll += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
