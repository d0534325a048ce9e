"""Cutting a student from a teacher: exact where nothing is cut, shapes, ties, reload, importance, errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from distilkit.errors import ConfigError
from distilkit.models.pruning import PruneReport, cut_from_teacher
from distilkit.models.pruning.layouts import layout_for

VOCAB = 64
FIELD = "model.student.from_teacher"

CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "n_layer": 4,
        "n_embd": 32,
        "n_head": 4,
        "n_positions": 32,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "llama": {
        "num_hidden_layers": 4,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
    },
    "qwen2": {
        "num_hidden_layers": 4,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
    },
    "gpt_neox": {
        "num_hidden_layers": 4,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
    },
}
FAMILIES = list(CONFIGS)


def tiny(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random model whose weights, biases and norm gains are all far from their init (so a slip in
    slicing or ordering shows in the logits)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **{**CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(
                    1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p)
                )
            else:
                p.normal_(0, 0.15)
    return model.eval()


def batches(seed: int = 1, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Calibration batches (2, 12), the second row of each right-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def keep_blocks(teacher: Any, layers: list[int]) -> Any:
    """The teacher with every other block removed by hand."""
    model = copy.deepcopy(teacher)
    layout = layout_for(model.config.model_type)
    assert layout is not None
    parent, name = layout.blocks.rsplit(".", 1)
    blocks = model.get_submodule(layout.blocks)
    setattr(model.get_submodule(parent), name, nn.ModuleList([blocks[i] for i in layers]))
    model.config.num_hidden_layers = len(layers)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def cut(teacher: Any, targets: dict[str, Any], **kwargs: Any) -> tuple[Any, PruneReport]:
    """``cut_from_teacher``, its student typed loosely so tests can reach into the family's modules."""
    return cut_from_teacher(teacher, targets, **kwargs)


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -- 1. nothing cut: the teacher's logits, exactly ------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_keeping_everything_reproduces_the_teacher(model_type: str, importance: str) -> None:
    teacher = tiny(model_type)
    student, report = cut(teacher, {}, importance=importance, calibration=batches())
    assert student is not teacher and type(student) is type(teacher)
    assert torch.equal(logits(student), logits(teacher))
    assert report.params_after == report.params_before == n_params(teacher)
    assert report.layers == [0, 1, 2, 3] and report.kept_share == {
        "heads": 1.0,
        "neurons": 1.0,
        "channels": 1.0,
    }


@pytest.mark.parametrize(
    ("model_type", "options"),
    [("gpt_neox", {"use_parallel_residual": False}), ("llama", {"attention_bias": True, "mlp_bias": True})],
)
def test_other_variants_are_reproduced_too(model_type: str, options: dict[str, Any]) -> None:
    teacher = tiny(model_type, **options)
    student, _ = cut(teacher, {}, importance="magnitude")
    assert torch.equal(logits(student), logits(teacher))
    small, _ = cut(teacher, {"hidden_size": 16, "intermediate_size": 40}, importance="magnitude")
    assert n_params(small) == n_params(AutoModelForCausalLM.from_config(small.config))


# -- 2. depth only: the kept blocks run in sequence -----------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_named_layers_reproduce_the_kept_blocks(model_type: str) -> None:
    teacher = tiny(model_type)
    student, report = cut(teacher, {}, layers=[0, 2])  # DistilBERT style, no data needed
    assert report.layers == [0, 2] and report.layers_given and report.block_scores is None
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(student), logits(keep_blocks(teacher, [0, 2])), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ranked_layers_reproduce_the_kept_blocks(model_type: str) -> None:
    teacher = tiny(model_type)
    name = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    student, report = cut(teacher, {name: 3}, calibration=batches())
    assert len(report.layers) == 3 and report.block_scores is not None and len(report.block_scores) == 4
    dropped = ({0, 1, 2, 3} - set(report.layers)).pop()
    assert report.block_scores[dropped] == min(report.block_scores)
    torch.testing.assert_close(logits(student), logits(keep_blocks(teacher, report.layers)), rtol=0, atol=0)


def _loss(model: Any, data: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy where both tokens are real, written out independently of the library."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data:
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            out = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
            valid = mask[:, 1:] & mask[:, :-1]  # (B, T-1)
            total += float(
                torch.nn.functional.cross_entropy(out[:, :-1][valid], ids[:, 1:][valid], reduction="sum")
            )
            count += int(valid.sum())
    return total / count


@pytest.mark.parametrize("model_type", FAMILIES)
def test_loss_ranking_drops_blocks_greedily_by_the_teachers_loss(model_type: str) -> None:
    teacher, data = tiny(model_type), batches()
    name = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    student, report = cut(teacher, {name: 2}, calibration=data, layer_ranking="loss", importance="magnitude")
    left, expected = [0, 1, 2, 3], []
    for _ in range(2):  # by hand: drop the block whose removal raises the loss least
        losses = {i: _loss(keep_blocks(teacher, [j for j in left if j != i]), data) for i in left}
        best = min(losses, key=lambda i: losses[i])
        left.remove(best)
        expected.append((best, losses[best]))
    assert report.layers == left and report.layer_ranking == "loss"
    assert report.drop_order is not None and [i for i, _ in report.drop_order] == [i for i, _ in expected]
    torch.testing.assert_close(
        torch.tensor([x for _, x in report.drop_order]), torch.tensor([x for _, x in expected])
    )
    assert report.full_loss == pytest.approx(_loss(teacher, data), rel=1e-5)
    torch.testing.assert_close(logits(student), logits(keep_blocks(teacher, left)), rtol=0, atol=0)
    assert "blocks kept (ranked by the loss without them)" in str(report)
    assert "blocks dropped in turn" in str(report)


def test_loss_ranking_drops_an_identity_block_first() -> None:
    teacher = tiny("gpt2")
    block = teacher.transformer.h[2]
    _zero_(block.attn.c_proj.weight, block.attn.c_proj.bias, block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    _, report = cut(
        teacher, {"n_layer": 3}, calibration=batches(), layer_ranking="loss", importance="magnitude"
    )
    assert report.layers == [0, 1, 3] and report.drop_order is not None
    assert report.drop_order[0][0] == 2 and report.drop_order[0][1] == pytest.approx(
        report.full_loss, rel=1e-6
    )


def test_gpt2_scaling_by_inverse_block_index_follows_the_kept_blocks() -> None:
    teacher = tiny("gpt2", scale_attn_by_inverse_layer_idx=True)  # scores divided by (block index + 1)
    student, _ = cut(teacher, {}, layers=[1, 3])
    torch.testing.assert_close(logits(student), logits(keep_blocks(teacher, [1, 3])))
    t, s = teacher.transformer.h[1].attn.c_attn, student.transformer.h[0].attn.c_attn
    assert torch.equal(s.weight[:, :32], t.weight[:, :32] * 0.5)  # queries x (0 + 1) / (1 + 1)
    assert torch.equal(s.weight[:, 32:], t.weight[:, 32:])  # keys and values as they were


def test_qwen2_sliding_layer_types_follow_the_kept_blocks() -> None:
    teacher = tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student, _ = cut(teacher, {}, layers=[1, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(
        0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3)
    )  # longer than the window
    torch.testing.assert_close(
        logits(student, ids), logits(keep_blocks(teacher, [1, 3]), ids), rtol=0, atol=0
    )


# -- 3. shapes, config fields and parameter counts ---------------------------------------------------


def gpt2_params(v: int, p: int, h: int, layers: int, inner: int, tied: bool) -> int:
    block = 2 * 2 * h + h * 3 * h + 3 * h + h * h + h + h * inner + inner + inner * h + h
    return v * h + p * h + layers * block + 2 * h + (0 if tied else v * h)


def llama_params(v: int, h: int, layers: int, heads: int, kv: int, d: int, inner: int, bias: bool) -> int:
    attn = h * heads * d + 2 * h * kv * d + heads * d * h + ((heads + 2 * kv) * d if bias else 0)
    return v * h + layers * (attn + 3 * h * inner + 2 * h) + h + v * h


@pytest.mark.parametrize(
    ("targets", "head_dim"),
    [({"n_layer": 2, "n_embd": 16, "n_head": 2, "n_inner": 40}, 8), ({"n_embd": 16}, 4)],
)
def test_gpt2_shapes_and_counts(targets: dict[str, int], head_dim: int) -> None:
    teacher = tiny("gpt2")
    student, report = cut(teacher, targets, importance="magnitude", calibration=batches())
    c = student.config
    want = {"n_layer": 4, "n_embd": 32, "n_head": 4, "n_inner": 128, **targets}
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner) == tuple(want.values())
    assert report.sizes_after == want and report.sizes_before == {
        "n_layer": 4,
        "n_embd": 32,
        "n_head": 4,
        "n_inner": 128,
    }
    attn = student.transformer.h[0].attn
    assert attn.head_dim == head_dim and attn.c_attn.weight.shape == (want["n_embd"], 3 * want["n_embd"])
    assert student.transformer.h[-1].mlp.c_fc.weight.shape == (want["n_embd"], want["n_inner"])
    assert student.transformer.wpe.weight.shape == (32, want["n_embd"])
    count = gpt2_params(VOCAB, 32, want["n_embd"], want["n_layer"], want["n_inner"], tied=True)
    assert n_params(student) == count == report.params_after
    assert n_params(AutoModelForCausalLM.from_config(c)) == count
    assert report.params_before == gpt2_params(VOCAB, 32, 32, 4, 128, tied=True)
    assert len(report.channels) == want["n_embd"] and report.channels == sorted(report.channels)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llama_shapes_and_counts_keep_head_dim_and_groups(model_type: str) -> None:
    teacher = tiny(model_type)
    targets = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24}
    student, report = cut(teacher, targets, calibration=batches())
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 16, 2, 24)
    assert c.num_key_value_heads == 1 and c.head_dim == 8  # heads per group and head_dim kept
    layer = student.model.layers[0].self_attn
    assert layer.q_proj.weight.shape == (16, 16) and layer.k_proj.weight.shape == (8, 16)
    assert all(h in ([0, 1], [2, 3]) for h in report.heads)  # whole groups
    count = llama_params(VOCAB, 16, 2, 2, 1, 8, 24, bias=model_type == "qwen2")
    assert n_params(student) == count == n_params(AutoModelForCausalLM.from_config(c)) == report.params_after


def test_gqa_lone_kv_head_count_brings_the_query_heads() -> None:
    student, report = cut(tiny("llama"), {"num_key_value_heads": 1}, importance="magnitude")
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 1)
    assert report.sizes_after["num_attention_heads"] == 2


def test_neox_keeps_its_rotary_dims_when_heads_shrink() -> None:
    teacher = tiny("gpt_neox")  # D = 8, partial_rotary_factor 0.25: 2 rotary dims per head
    student, _ = cut(teacher, {"hidden_size": 16}, importance="magnitude")
    assert student.config.rope_parameters["partial_rotary_factor"] == 0.5
    attn = student.gpt_neox.layers[0].attention
    assert (attn.head_size, attn.rotary_ndims) == (4, 2)
    assert n_params(student) == n_params(AutoModelForCausalLM.from_config(student.config))


# -- 4. ties ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "tied"), [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)]
)
def test_tied_heads_stay_tied_and_untied_stay_untied(model_type: str, tied: bool) -> None:
    teacher = tiny(model_type, tie_word_embeddings=tied)
    assert (teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight) == tied
    width = {"n_embd": 16} if model_type == "gpt2" else {"hidden_size": 16}
    student, report = cut(teacher, width, importance="magnitude")
    head, embed = student.get_output_embeddings().weight, student.get_input_embeddings().weight
    assert (head is embed) == tied and student.config.tie_word_embeddings == tied
    kept = torch.tensor(report.channels)
    assert torch.equal(embed, teacher.get_input_embeddings().weight[:, kept])
    assert torch.equal(head, teacher.get_output_embeddings().weight[:, kept])


# -- 5. export and reload -----------------------------------------------------------------------------


CUTS = {
    "gpt2": {"n_layer": 2, "n_embd": 16, "n_inner": 48},
    "llama": {"num_hidden_layers": 3, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 40},
    "qwen2": {"num_hidden_layers": 3, "hidden_size": 24, "num_key_value_heads": 1},
    "gpt_neox": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 40},
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_cut_student_saves_and_reloads_to_the_same_logits(model_type: str, tmp_path) -> None:
    student, _ = cut(tiny(model_type), CUTS[model_type], calibration=batches())
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(student)
    assert torch.equal(logits(reloaded), logits(student))


# -- 6. importance is used ----------------------------------------------------------------------------


def _zero_(*tensors: torch.Tensor) -> None:
    with torch.no_grad():
        for t in tensors:
            t.zero_()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_block_influence_drops_an_identity_block(model_type: str) -> None:
    teacher = tiny(model_type)
    if model_type == "gpt2":
        block = teacher.transformer.h[1]
        _zero_(
            block.attn.c_proj.weight, block.attn.c_proj.bias, block.mlp.c_proj.weight, block.mlp.c_proj.bias
        )
        targets = {"n_layer": 3}
    else:
        block = teacher.model.layers[1]
        _zero_(block.self_attn.o_proj.weight, block.mlp.down_proj.weight)
        targets = {"num_hidden_layers": 3}
    _, report = cut(teacher, targets, importance="magnitude", calibration=batches())
    assert report.block_scores is not None and abs(report.block_scores[1]) < 1e-6
    assert min(s for i, s in enumerate(report.block_scores) if i != 1) > 1e-3
    assert report.layers == [0, 2, 3]


def test_block_influence_ignores_padded_tokens() -> None:
    teacher = tiny("gpt2")
    plain = batches()
    padded = []
    for batch in plain:  # the same batches with 4 more positions of masked garbage
        garbage = torch.randint(0, VOCAB, (2, 4))
        padded.append(
            {
                "input_ids": torch.cat([batch["input_ids"], garbage], 1),
                "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(garbage)], 1),
            }
        )
    _, a = cut(teacher, {"n_layer": 2}, importance="magnitude", calibration=plain)
    _, b = cut(teacher, {"n_layer": 2}, importance="magnitude", calibration=padded)
    assert a.block_scores is not None and b.block_scores is not None
    torch.testing.assert_close(torch.tensor(a.block_scores), torch.tensor(b.block_scores))


def test_magnitude_drops_a_zeroed_gpt2_head_and_neuron() -> None:
    teacher = tiny("gpt2")  # 4 heads of 8 dims, 128 MLP channels
    d = 8
    for block in teacher.transformer.h:
        for part in range(3):  # head 2 of q, k and v in the fused c_attn (stored as (in, out))
            cols = slice(part * 32 + 2 * d, part * 32 + 3 * d)
            _zero_(block.attn.c_attn.weight[:, cols], block.attn.c_attn.bias[cols])
        _zero_(block.attn.c_proj.weight[2 * d : 3 * d])
        _zero_(block.mlp.c_fc.weight[:, 5], block.mlp.c_fc.bias[5:6], block.mlp.c_proj.weight[5])
    student, report = cut(teacher, {"n_head": 3, "n_embd": 24, "n_inner": 127}, importance="magnitude")
    assert report.heads == [[0, 1, 3]] * 4
    kept = torch.tensor(report.channels)
    neurons = [i for i in range(128) if i != 5]
    for t, s in zip(teacher.transformer.h, student.transformer.h, strict=True):
        assert torch.equal(s.mlp.c_fc.weight, t.mlp.c_fc.weight[kept][:, neurons])
        assert torch.equal(s.mlp.c_proj.weight, t.mlp.c_proj.weight[neurons][:, kept])


def test_magnitude_drops_a_zeroed_gqa_group() -> None:
    teacher = tiny("llama")  # 4 query heads over 2 key/value groups of head_dim 8
    for layer in teacher.model.layers:
        a = layer.self_attn
        _zero_(a.q_proj.weight[:16], a.k_proj.weight[:8], a.v_proj.weight[:8], a.o_proj.weight[:, :16])
    student, report = cut(teacher, {"num_key_value_heads": 1}, importance="magnitude")
    assert report.heads == [[2, 3]] * 4
    t, s = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    assert torch.equal(s.k_proj.weight, t.k_proj.weight[8:]) and torch.equal(
        s.o_proj.weight, t.o_proj.weight[:, 16:]
    )


def test_activation_drops_a_channel_that_is_never_active() -> None:
    teacher = tiny("llama")
    channel = 3  # zero in every embedding and every write to the residual stream: RMSNorm outputs 0 there
    _zero_(teacher.model.embed_tokens.weight[:, channel])
    with torch.no_grad():
        for layer in teacher.model.layers:
            _zero_(layer.self_attn.o_proj.weight[channel], layer.mlp.down_proj.weight[channel])
            for proj in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
            ):
                proj.weight[:, channel] *= 4  # large weights read it, so its magnitude stays high
    _, report = cut(teacher, {"hidden_size": 28}, calibration=batches())
    assert channel not in report.channels and len(report.channels) == 28
    _, by_weight = cut(teacher, {"hidden_size": 28}, importance="magnitude")
    assert channel in by_weight.channels  # only the activations tell


def test_activation_drops_an_mlp_channel_that_never_fires() -> None:
    teacher = tiny("gpt2")
    with torch.no_grad():
        for block in teacher.transformer.h:
            block.mlp.c_fc.bias[7] = -1e4  # gelu(-1e4 + small) == 0 for every token
    student, _ = cut(teacher, {"n_inner": 127}, calibration=batches())
    neurons = [i for i in range(128) if i != 7]
    for t, s in zip(teacher.transformer.h, student.transformer.h, strict=True):
        assert torch.equal(s.mlp.c_fc.bias, t.mlp.c_fc.bias[neurons])


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox"])
def test_smaller_heads_keep_the_teacher_attention_on_the_kept_dims(model_type: str) -> None:
    """When D shrinks (same head count, half the width), a head whose dropped dimensions carry zero weights
    computes exactly the teacher's attention: the kept q·k terms keep their scale (query scaled by
    sqrt(D'/D)), gpt_neox keeps its rotary dimensions, and v and the output projection keep the same dims."""
    teacher = tiny(model_type, **({"n_layer": 1} if model_type == "gpt2" else {"num_hidden_layers": 1}))
    d, h = 8, 32
    with torch.no_grad():
        if model_type == "gpt2":
            attn = teacher.transformer.h[0].attn
            for head in range(4):
                for part, dims in ((0, range(4, 8)), (1, range(4, 8)), (2, range(0, 4))):
                    cols = [part * h + head * d + i for i in dims]
                    attn.c_attn.weight[:, cols] = 0
                    attn.c_attn.bias[cols] = 0
        else:
            attn = teacher.gpt_neox.layers[0].attention
            for head in range(4):
                for part, dims in ((0, range(4, 8)), (1, range(4, 8)), (2, range(0, 4))):
                    rows = [head * 3 * d + part * d + i for i in dims]
                    attn.query_key_value.weight[rows] = 0
                    attn.query_key_value.bias[rows] = 0
    key = "n_embd" if model_type == "gpt2" else "hidden_size"
    student, report = cut(teacher, {key: 16}, importance="magnitude")
    kept = torch.tensor(report.channels)
    x = torch.randn(2, 9, h)
    x[..., [c for c in range(h) if c not in report.channels]] = 0  # the dropped channels carry nothing

    def run(model: Any, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if model_type == "gpt2":
                return model.transformer.h[0].attn(hidden)[0]
            positions = torch.arange(hidden.shape[1])[None]
            rope = model.gpt_neox.rotary_emb(hidden, positions)
            return model.gpt_neox.layers[0].attention(hidden, None, position_embeddings=rope)[0]

    torch.testing.assert_close(run(student, x[..., kept]), run(teacher, x)[..., kept], rtol=1e-5, atol=1e-6)


# -- the teacher, dtype, device, report ---------------------------------------------------------------


def test_teacher_is_left_as_it_was() -> None:
    teacher = tiny("llama").train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cut(teacher, {"num_hidden_layers": 2, "hidden_size": 16}, calibration=batches())
    assert teacher.training
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())


def test_student_takes_the_teacher_dtype_and_eval_mode() -> None:
    teacher = tiny("gpt2").to(torch.bfloat16).train()
    student, _ = cut(teacher, {"n_layer": 2, "n_embd": 16}, calibration=batches())
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16} and not student.training
    assert student.device == teacher.device


def test_report_prints_counts_sizes_ranking_and_heads() -> None:
    _, report = cut(tiny("llama"), {"num_hidden_layers": 2, "hidden_size": 16}, calibration=batches())
    text = str(report)
    assert f"{report.params_before / 1e6:.2f} M -> {report.params_after / 1e6:.2f} M" in text
    assert "num_hidden_layers 4 -> 2" in text and "hidden_size 32 -> 16" in text
    assert f"blocks kept (ranked by block influence): {report.layers}" in text
    assert "block influence 1 - cos(input, output) (* kept): 0: " in text
    assert "width ranked by activation" in text and "heads kept: block" in text
    assert len(report.lines()) == 7


# -- 7. bad input: one ConfigError naming the field ---------------------------------------------------


def check_error(match: str, teacher: Any, targets: dict[str, Any], **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError, match=match) as info:
        cut(teacher, targets, **kwargs)
    assert str(info.value).startswith(FIELD)
    return info.value


def test_unsupported_family_names_the_supported_ones() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "opt",
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=16,
    )
    error = check_error(
        "gpt2, llama, qwen2, gpt_neox", AutoModelForCausalLM.from_config(config), {"num_hidden_layers": 1}
    )
    assert error.value == "opt"


@pytest.mark.parametrize(
    ("model_type", "targets", "key", "match"),
    [
        ("gpt2", {"n_layers": 2}, "n_layers", "did you mean 'n_layer'"),
        ("gpt2", {"vocab_size": 32}, "vocab_size", "sizes that can be cut: n_layer, n_embd, n_head, n_inner"),
        ("gpt2", {"n_embd": 64}, "n_embd", "exceeds the teacher's n_embd=32"),
        ("gpt2", {"n_layer": 0}, "n_layer", "positive integer"),
        ("gpt2", {"n_layer": "2"}, "n_layer", "positive integer"),
        ("gpt2", {"n_layer": True}, "n_layer", "positive integer"),
        ("gpt2", {"n_head": 3}, "n_head", "must divide n_embd=32"),
        ("gpt2", {"n_head": 2}, "n_head", "head size n_embd/n_head = 16 would exceed the teacher's 8"),
        ("llama", {"hidden_size": 30}, "num_attention_heads", "must divide hidden_size=30"),
        (
            "llama",
            {"num_attention_heads": 4, "num_key_value_heads": 1},
            "num_attention_heads",
            "whole key/value",
        ),
        ("llama", {"num_attention_heads": 3}, "num_attention_heads", "must be 2 x num_key_value_heads"),
        ("gpt_neox", {"hidden_size": 4}, "hidden_size", "smaller than the 2 rotary dimensions"),
        ("gpt2", {"n_layer": 2.0}, "n_layer", "positive integer"),
    ],
)
def test_bad_sizes(model_type: str, targets: dict[str, Any], key: str, match: str) -> None:
    error = check_error(match, tiny(model_type), targets, importance="magnitude")
    assert error.field == f"{FIELD}.{key}"


def test_gpt2_accepts_the_canonical_aliases_once() -> None:
    student, _ = cut(tiny("gpt2"), {"num_hidden_layers": 2}, layers=[1, 3])
    assert student.config.n_layer == 2
    check_error("repeats n_layer", tiny("gpt2"), {"n_layer": 2, "num_hidden_layers": 2}, layers=[1, 3])


@pytest.mark.parametrize(
    ("layers", "targets", "match"),
    [
        ([0, 4], {}, r"holds 4, not a block index in \[0, 3\]"),
        ([-1, 2], {}, "holds -1"),
        ([1, 1], {}, "repeats a block"),
        ([2, 0], {}, "not in increasing order"),
        ([0, 1, 2], {"n_layer": 2}, "names 3 blocks but the target layer count is 2"),
        ([], {}, "non-empty list"),
        ("01", {}, "non-empty list"),
        (2, {}, "non-empty list"),
        ([0, 1.0], {}, "holds 1.0"),
    ],
)
def test_bad_layers(layers: Any, targets: dict[str, int], match: str) -> None:
    error = check_error(match, tiny("gpt2"), targets, layers=layers)
    assert error.field == f"{FIELD}.layers"


def test_neox_head_size_that_cannot_hold_the_rotary_dims_exactly() -> None:
    # D = 48 with 30 rotary dims (factor 0.625); D' = 44 would need factor 30/44, and int(44 * 30/44) == 29
    teacher = tiny(
        "gpt_neox", hidden_size=96, num_attention_heads=2, rope_parameters={"partial_rotary_factor": 0.625}
    )
    assert layout_for("gpt_neox").rotary_dims(teacher.config) == 30  # type: ignore[union-attr]
    error = check_error(
        "cannot hold the teacher's 30 rotary dimensions", teacher, {"hidden_size": 88}, importance="magnitude"
    )
    assert error.field == f"{FIELD}.hidden_size"


def test_bad_importance() -> None:
    error = check_error("not a known importance", tiny("gpt2"), {}, importance="taylor")
    assert error.field == f"{FIELD}.importance"


def test_bad_layer_ranking() -> None:
    with pytest.raises(ConfigError, match=rf"{FIELD}.layer_ranking='cosine': is not a known ranking"):
        cut(tiny("gpt2"), {"n_layer": 2}, calibration=batches(), layer_ranking="cosine")


def test_data_is_required_where_it_is_used() -> None:
    teacher = tiny("gpt2")
    error = check_error("activation importance needs calibration data", teacher, {"n_embd": 16})
    assert error.field == f"{FIELD}.calibration_batches"
    error = check_error(
        "ranking blocks to drop needs calibration data", teacher, {"n_layer": 2}, importance="magnitude"
    )
    assert error.field == f"{FIELD}.calibration_batches"
    cut(teacher, {"n_embd": 16}, importance="magnitude")  # weights alone suffice
    cut(teacher, {}, layers=[0, 3])  # named blocks and full width: no data


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        ([{"ids": torch.zeros(1, 4, dtype=torch.long)}], "dict with input_ids"),
        ([{"input_ids": torch.zeros(4, dtype=torch.long)}], "dict with input_ids"),
        (
            [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)}],
            "shape of input_ids",
        ),
        ([], "no valid token"),
    ],
)
def test_bad_calibration_batches(calibration: Any, match: str) -> None:
    error = check_error(match, tiny("gpt2"), {"n_embd": 16}, calibration=calibration)
    assert error.field == f"{FIELD}.calibration_batches"
