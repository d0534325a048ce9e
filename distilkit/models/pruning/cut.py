"""Cut a student from a teacher: keep its most important blocks, heads, MLP and hidden channels.

The student starts from the teacher's own weights instead of random ones, as DistilBERT (every other
layer) and NVIDIA's Minitron (depth and width pruned by measured importance; Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation") do, then is distilled as usual.

``cut_from_teacher(teacher, {"n_layer": 2, "n_embd": 128}, calibration=batches)`` returns a fresh
Hugging Face model of the teacher's class and a :class:`PruneReport`:

* **Depth**: ``layers=[0, 2]`` keeps exactly those blocks, in that order; otherwise blocks are ranked on
  calibration data and the best kept, in their original order: by ``layer_ranking="influence"``, the
  blocks with the largest influence (mean 1 − cos(input, output)); by ``"loss"``, the blocks left by
  dropping, one at a time, the block whose removal raises the teacher's next-token loss least.
  Ranking blocks needs data, whatever ``importance`` says: without it, name the blocks.
* **Width**, ranked per kept block by ``importance`` (:mod:`distilkit.models.pruning.importance`): whole heads
  (with grouped-query attention, whole key/value groups with all their query heads, so the target keeps
  the teacher's heads per group); MLP channels; and hidden channels, cut consistently through the
  embeddings, every block, every norm, the final norm and the LM head (tied heads stay tied).
* **Head dimension**: llama and qwen2 keep the teacher's ``head_dim`` (written into the new config).
  gpt2 and gpt_neox derive it from the width (D = H / N), so a narrower model with as many heads has
  smaller heads: each kept head keeps its most important query/key dimensions (the same ones for q and
  k) and, separately, value dimensions (the same ones for v and the output projection). The query
  weights are scaled by sqrt(D'/D) so each kept q·k term keeps its scale (the scores then equal the
  teacher's minus the dropped terms). gpt_neox keeps all rotary dimensions of each head and cuts only the
  others (its ``partial_rotary_factor`` becomes R / D').

Cutting nothing reproduces the teacher's logits exactly; cutting only depth reproduces the teacher's
kept blocks run in sequence. The teacher is not modified.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from distilkit.errors import ConfigError
from distilkit.models.pruning.importance import (
    LayerScores,
    Scores,
    drop_by_loss,
    magnitude_outside_blocks,
    magnitude_scores,
    measure_activations,
)
from distilkit.models.pruning.layouts import (
    BlockWeights,
    Layout,
    StateDict,
    layout_for,
    supported_model_types,
)

Importance = Literal["activation", "magnitude"]
IMPORTANCES = ("activation", "magnitude")
LayerRanking = Literal["influence", "loss"]
LAYER_RANKINGS = ("influence", "loss")


@dataclasses.dataclass
class PruneReport:
    """What a cut kept, for printing and for tests.

    Attributes:
        model_type: the family.
        importance: how width was ranked (``"activation"`` or ``"magnitude"``).
        width_cut: some width (hidden size, heads or MLP size) was cut.
        sizes_before / sizes_after: the teacher's and the student's sizes by config field name.
        params_before / params_after: parameter counts (tied weights once).
        layers: the teacher blocks kept, in the student's order.
        layers_given: the blocks were named (``layers=``) rather than ranked.
        block_scores: block influence (mean 1 − cos(input, output)) per teacher block, or None without data.
        heads: per kept block, the teacher's query heads kept.
        channels: the teacher's hidden channels kept (the same in every block).
        kept_share: per unit (``heads``, ``neurons``, ``channels``), the share of the importance kept.
        layer_ranking: how blocks were ranked when they were (``"influence"`` or ``"loss"``).
        drop_order: with ``"loss"``, the blocks dropped in turn and the teacher's loss without them.
        full_loss: with ``"loss"``, the whole teacher's loss on the calibration data.
        calibration: what the ranking was measured on (batches, blocks, tokens), or None without data.
    """

    model_type: str
    importance: str
    width_cut: bool
    sizes_before: dict[str, int]
    sizes_after: dict[str, int]
    params_before: int
    params_after: int
    layers: list[int]
    layers_given: bool
    block_scores: list[float] | None
    heads: list[list[int]]
    channels: list[int]
    kept_share: dict[str, float]
    layer_ranking: str = "influence"
    drop_order: list[tuple[int, float]] | None = None
    full_loss: float | None = None
    calibration: str | None = None

    def lines(self) -> list[str]:
        """A short readable summary, one item per line."""
        ratio = self.params_after / self.params_before
        sizes = ", ".join(f"{k} {self.sizes_before[k]} -> {v}" for k, v in self.sizes_after.items())
        width = f"width ranked by {self.importance}" if self.width_cut else "full width"
        out = [
            f"{self.model_type} student cut from the teacher ({width})",
            f"  parameters: {_millions(self.params_before)} -> {_millions(self.params_after)} ({ratio:.1%})",
            f"  sizes: {sizes}",
        ]
        if self.calibration is not None:
            out.append(f"  calibration: {self.calibration}")
        dropped = len(self.layers) < next(iter(self.sizes_before.values()))  # the layer count comes first
        ranked = "ranked by the loss without them" if self.drop_order else "ranked by block influence"
        how = "named" if self.layers_given else ranked if dropped else "all"
        out.append(f"  blocks kept ({how}): {self.layers}")
        if self.drop_order:
            steps = ", ".join(f"{i} -> {loss:.4f}" for i, loss in self.drop_order)
            out.append(
                f"  blocks dropped in turn, next-token loss after (whole: {self.full_loss:.4f}): {steps}"
            )
        if self.block_scores is not None:
            scores = ", ".join(
                f"{i}: {s:.4f}" + ("*" if i in self.layers else "") for i, s in enumerate(self.block_scores)
            )
            out.append(f"  block influence 1 - cos(input, output) (* kept): {scores}")
        out.append(
            "  heads kept: "
            + "; ".join(f"block {i}: {h}" for i, h in zip(self.layers, self.heads, strict=True))
        )
        share = ", ".join(f"{k} {v:.1%}" for k, v in self.kept_share.items())
        out.append(f"  importance kept: {share}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclasses.dataclass
class _LayerPlan:
    """What one student block keeps of teacher block ``source`` (indices into the teacher's)."""

    source: int
    heads: Tensor  # (N',) query heads
    kv_heads: Tensor  # (G',) key/value heads
    neurons: Tensor  # (I',)
    qk_dims: Tensor | None  # (N', D') per kept head, when the head dimension is cut
    v_dims: Tensor | None  # (N', D')
    query_scale: float


def cut_from_teacher(
    teacher: PreTrainedModel,
    targets: Mapping[str, int],
    *,
    layers: Sequence[int] | None = None,
    importance: Importance = "activation",
    calibration: Iterable[Mapping[str, Tensor]] | None = None,
    layer_ranking: LayerRanking = "influence",
    field: str = "model.student.from_teacher",
) -> tuple[PreTrainedModel, PruneReport]:
    """A student cut from ``teacher`` to the ``targets`` sizes, with the teacher's most important weights.

    Args:
        teacher: a Hugging Face causal LM of a supported family (gpt2, llama, qwen2, gpt_neox).
        targets: sizes by the teacher's config field names (``n_layer``, ``n_embd``, ``n_head``,
            ``n_inner`` for gpt2; ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size`` for llama/qwen2; the same without
            ``num_key_value_heads`` for gpt_neox). Sizes left out keep the teacher's value, except that
            with grouped-query attention a lone head count or key/value head count brings the other along
            (heads per group stay the teacher's), and ``layers`` alone sets the layer count.
        layers: keep exactly these teacher blocks (increasing, no repeats) instead of ranking them.
        importance: how heads, MLP channels and hidden channels are ranked: ``"activation"`` (needs
            ``calibration``) or ``"magnitude"`` (weight norms).
        calibration: batches (dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T)),
            iterated once (held as a list for ``layer_ranking="loss"``); needed for activation importance
            and for ranking blocks. When given, block influence is measured and reported even if
            ``layers`` names the blocks.
        layer_ranking: how blocks are ranked when ``layers`` is not given: ``"influence"`` (block
            influence, one pass) or ``"loss"`` (greedy elimination by the teacher's next-token loss,
            L + (L − 1) + ... + (k + 1) passes; :func:`~distilkit.models.pruning.importance.drop_by_loss`).
        field: the config field this cut came from, named in error messages.

    Returns:
        The student (the teacher's class, a new config, the teacher's dtype and device, eval mode) and a
        report of what was kept.

    Raises:
        ConfigError: an unsupported family, an unknown or bad size, a bad ``layers`` or ``importance``,
            or missing calibration data where it is needed.
    """
    layout = _layout(teacher, field)
    config = teacher.config
    before = layout.sizes(config)
    after = _target_sizes(layout, config, targets, layers, field)
    named = _check_layers(layers, before["layers"], after["layers"], field)
    if importance not in IMPORTANCES:
        raise ConfigError(
            f"{field}.importance", importance, "is not a known importance", f"use one of {IMPORTANCES}"
        )
    if layer_ranking not in LAYER_RANKINGS:
        raise ConfigError(
            f"{field}.layer_ranking", layer_ranking, "is not a known ranking", f"use one of {LAYER_RANKINGS}"
        )
    cuts_width = any(after[r] != before[r] for r in ("hidden", "heads", "inner"))
    _require_data(calibration, named, before, after, importance, cuts_width, field)

    head_dim = layout.head_dim(config)
    measured, drop_order, full_loss = None, None, None
    data_field = f"{field}.calibration_batches"
    if calibration is not None:
        calibration = list(calibration) if layer_ranking == "loss" else calibration
        measured = measure_activations(teacher, layout, head_dim, calibration, field=data_field)
    if named is not None:
        kept = named
    elif layer_ranking == "loss" and after["layers"] < before["layers"]:
        assert isinstance(calibration, list)  # _require_data checked that there is data
        kept, drop_order, full_loss = drop_by_loss(
            teacher, layout, calibration, after["layers"], field=data_field
        )
    else:
        kept = _rank_blocks(measured, before["layers"], after["layers"])

    sd = teacher.state_dict()
    blocks = {i: layout.read_block(sd, f"{layout.blocks}.{i}.", head_dim) for i in kept}
    if importance == "activation" and measured is not None:
        width = Scores([measured.layers[i] for i in kept], measured.channels)
    else:  # magnitude, or activation with nothing to cut in width (any ranking keeps everything)
        width = Scores([magnitude_scores(b) for b in blocks.values()], magnitude_outside_blocks(sd, layout))
    channels = _top(width.channels + sum(s.channels for s in width.layers), after["hidden"])
    plans = [
        _layer_plan(layout, config, source, target, s, before, after)
        for target, (source, s) in enumerate(zip(kept, width.layers, strict=True))
    ]
    student = _build(
        teacher, layout.new_config(config, after, kept), _cut_state(layout, sd, blocks, plans, channels)
    )

    influence = None if measured is None or measured.block_influence is None else measured.block_influence
    report = PruneReport(
        model_type=config.model_type,
        importance=importance,
        width_cut=cuts_width,
        sizes_before={name: before[role] for role, name in layout.fields.items() if name},
        sizes_after={name: after[role] for role, name in layout.fields.items() if name},
        params_before=_count(teacher),
        params_after=_count(student),
        layers=kept,
        layers_given=named is not None,
        block_scores=None if influence is None else influence.tolist(),
        heads=[p.heads.tolist() for p in plans],
        channels=channels.tolist(),
        kept_share=_kept_share(width, plans, channels),
        layer_ranking=layer_ranking,
        drop_order=drop_order,
        full_loss=full_loss,
    )
    return student, report


# -- checking the request -----------------------------------------------------------------------------


def _layout(teacher: Any, field: str) -> Layout:
    model_type = getattr(getattr(teacher, "config", None), "model_type", type(teacher).__name__)
    layout = layout_for(model_type)
    if layout is None:
        raise ConfigError(
            field,
            model_type,
            f"a student can be cut only from a teacher of model_type {', '.join(supported_model_types())}",
            "use such a teacher, or give the student as a config mapping (random init)",
        )
    if teacher.get_output_embeddings() is None:
        raise ConfigError(
            field, type(teacher).__name__, "the teacher has no language-model head", "load it as a causal LM"
        )
    if getattr(teacher.config, "add_cross_attention", False):
        raise ConfigError(
            field,
            "add_cross_attention",
            "a teacher with cross-attention cannot be cut",
            "use a decoder-only teacher",
        )
    return layout


def _target_sizes(
    layout: Layout,
    config: PretrainedConfig,
    targets: Mapping[str, Any],
    layers: Sequence[int] | None,
    field: str,
) -> dict[str, int]:
    """The student's size of every role, checked against the teacher's."""
    before = layout.sizes(config)
    roles = {name: role for role, name in layout.fields.items() if name is not None}
    aliases = {alias: name for alias, name in getattr(config, "attribute_map", {}).items() if name in roles}
    given: dict[str, int] = {}
    for key, value in targets.items():
        name = aliases.get(key, key)
        if name not in roles:
            close = difflib.get_close_matches(key, [*roles, *aliases], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{field}.{key}",
                value,
                f"is not a size a {config.model_type} teacher can be cut in",
                f"{hint}sizes that can be cut: {', '.join(roles)}",
            )
        role = roles[name]
        if role in given:
            raise ConfigError(f"{field}.{key}", value, f"repeats {name}", "give each size once")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field}.{key}", value, "must be a positive integer", "give a size such as 2")
        if value > before[role]:
            raise ConfigError(
                f"{field}.{key}",
                value,
                f"exceeds the teacher's {name}={before[role]}",
                "cutting only shrinks: choose a smaller size",
            )
        given[role] = value
    if isinstance(layers, Sequence) and not isinstance(layers, str) and "layers" not in given:
        given["layers"] = len(layers)  # checked against the blocks by _check_layers
    after = {**before, **given}
    _resolve_groups(layout, before, given, after, field)
    _check_heads(layout, config, before, after, field)
    return after


def _resolve_groups(
    layout: Layout, before: Mapping[str, int], given: Mapping[str, int], after: dict[str, int], field: str
) -> None:
    """With grouped-query attention, keep the teacher's query heads per key/value head."""
    group = before["heads"] // before["kv_heads"]
    heads_name, kv_name = layout.fields["heads"], layout.fields["kv_heads"]
    if kv_name is None:
        after["kv_heads"] = after["heads"]
        return
    if "heads" in given and "kv_heads" not in given:
        after["kv_heads"] = after["heads"] // group
    elif "kv_heads" in given and "heads" not in given:
        after["heads"] = after["kv_heads"] * group
    if after["heads"] != after["kv_heads"] * group:
        raise ConfigError(
            f"{field}.{heads_name}",
            after["heads"],
            f"whole key/value groups are kept, so {heads_name} must be {group} x {kv_name} (the teacher's "
            f"{before['heads']} heads over {before['kv_heads']} groups; {kv_name}={after['kv_heads']})",
            f"choose {heads_name} as a multiple of {group}",
        )


def _check_heads(
    layout: Layout, config: PretrainedConfig, before: Mapping[str, int], after: Mapping[str, int], field: str
) -> None:
    """The width must split into the heads; where the head dimension follows, it can only shrink."""
    hidden, heads = layout.fields["hidden"], layout.fields["heads"]
    if after["hidden"] % after["heads"]:
        raise ConfigError(
            f"{field}.{heads}",
            after["heads"],
            f"must divide {hidden}={after['hidden']}",
            f"choose {heads} among the divisors of {after['hidden']}",
        )
    if not layout.cuts_head_dim:
        return
    old_dim, new_dim = layout.head_dim(config), after["hidden"] // after["heads"]
    if new_dim > old_dim:
        raise ConfigError(
            f"{field}.{heads}",
            after["heads"],
            f"the head size {hidden}/{heads} = {new_dim} would exceed the teacher's {old_dim}",
            f"cut {hidden} along with {heads} (e.g. {hidden}={after['heads'] * old_dim})",
        )
    rotary = layout.rotary_dims(config)
    if new_dim < rotary:
        raise ConfigError(
            f"{field}.{hidden}",
            after["hidden"],
            f"the head size {hidden}/{heads} = {new_dim} would be smaller than the {rotary} rotary "
            "dimensions per head",
            f"keep {hidden}/{heads} >= {rotary} (cut {heads} along with {hidden})",
        )
    if rotary and int(new_dim * (rotary / new_dim)) != rotary:  # how transformers counts rotary dims
        raise ConfigError(
            f"{field}.{hidden}",
            after["hidden"],
            f"a head size of {new_dim} cannot hold the teacher's {rotary} rotary dimensions exactly "
            f"(int({new_dim} * {rotary}/{new_dim}) rounds to {int(new_dim * (rotary / new_dim))})",
            f"choose {hidden} and {heads} for another head size",
        )


def _check_layers(layers: Sequence[int] | None, count: int, target: int, field: str) -> list[int] | None:
    """``layers`` as a list, checked: ints in range, strictly increasing, as many as the target count."""
    if layers is None:
        return None
    name = f"{field}.layers"
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ConfigError(name, layers, "must be a non-empty list of block indices", "e.g. [0, 2]")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
            raise ConfigError(
                name,
                list(layers),
                f"holds {i!r}, not a block index in [0, {count - 1}]",
                "name the teacher's blocks",
            )
    if len(set(layers)) != len(layers):
        raise ConfigError(name, list(layers), "repeats a block", "name each block once")
    if list(layers) != sorted(layers):
        raise ConfigError(
            name, list(layers), "is not in increasing order", "list the blocks in the teacher's order"
        )
    if len(layers) != target:
        raise ConfigError(
            name,
            list(layers),
            f"names {len(layers)} blocks but the target layer count is {target}",
            "make them agree",
        )
    return list(layers)


def _require_data(
    calibration: Any,
    layers: list[int] | None,
    before: Mapping[str, int],
    after: Mapping[str, int],
    importance: str,
    cuts_width: bool,
    field: str,
) -> None:
    if calibration is not None:
        return
    if layers is None and after["layers"] < before["layers"]:
        raise ConfigError(
            f"{field}.calibration_batches",
            None,
            "ranking blocks to drop needs calibration data (block influence is measured on it)",
            "give calibration batches, or name the blocks to keep with layers: [...]",
        )
    if importance == "activation" and cuts_width:
        raise ConfigError(
            f"{field}.calibration_batches",
            None,
            "activation importance needs calibration data",
            "give calibration batches, or use importance: magnitude",
        )


# -- choosing and slicing -----------------------------------------------------------------------------


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores (ties: the lower index), in increasing order."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices[:k]
    return order.sort().values.to(scores.device)


def _rank_blocks(measured: Scores | None, count: int, target: int) -> list[int]:
    """All blocks when none is dropped; else the ``target`` most influential, in the teacher's order."""
    if target == count:
        return list(range(count))
    assert measured is not None and measured.block_influence is not None  # _require_data checked
    return _top(measured.block_influence, target).tolist()


def _layer_plan(
    layout: Layout,
    config: PretrainedConfig,
    source: int,
    target: int,
    scores: LayerScores,
    before: Mapping[str, int],
    after: Mapping[str, int],
) -> _LayerPlan:
    group = before["heads"] // before["kv_heads"]
    group_scores = scores.heads.sum(1).view(before["kv_heads"], group).sum(1)  # (G,)
    kv_heads = _top(group_scores, after["kv_heads"])
    heads = (kv_heads[:, None] * group + torch.arange(group, device=kv_heads.device)).flatten()  # (N',)
    old_dim = layout.head_dim(config)
    new_dim = after["hidden"] // after["heads"] if layout.cuts_head_dim else old_dim
    qk_dims = v_dims = None
    if new_dim != old_dim:
        assert scores.qk is not None
        rotary = layout.rotary_dims(config)
        fixed = torch.arange(rotary, device=heads.device)
        qk_dims = torch.stack(
            [
                torch.cat([fixed, rotary + _top(scores.qk[h, rotary:], new_dim - rotary)])
                for h in heads.tolist()
            ]
        )  # (N', D')
        v_dims = torch.stack([_top(scores.heads[h], new_dim) for h in heads.tolist()])  # (N', D')
    return _LayerPlan(
        source=source,
        heads=heads,
        kv_heads=kv_heads,
        neurons=_top(scores.neurons, after["inner"]),
        qk_dims=qk_dims,
        v_dims=v_dims,
        query_scale=layout.query_scale(config, source, target, old_dim, new_dim),
    )


def _pick(t: Tensor, axis: int, heads: Tensor, dims: Tensor | None) -> Tensor:
    """Heads ``heads`` along ``axis``, then (if given) per-head dimensions ``dims`` (N', D') on the next."""
    heads = heads.to(t.device)
    t = t.index_select(axis, heads)
    if dims is None:
        return t
    shape = [1] * t.ndim
    shape[axis], shape[axis + 1] = dims.shape
    size = list(t.shape)
    size[axis + 1] = dims.shape[1]
    return t.gather(axis + 1, dims.to(t.device).view(shape).expand(size))


def _slice_block(block: BlockWeights, plan: _LayerPlan, channels: Tensor) -> BlockWeights:
    """The kept part of a teacher block (new tensors; the teacher's are untouched)."""
    ch, neurons = channels.to(block.q.device), plan.neurons.to(block.q.device)
    q = _pick(block.q, 0, plan.heads, plan.qk_dims).index_select(2, ch)  # (N', D', H')
    k = _pick(block.k, 0, plan.kv_heads, plan.qk_dims).index_select(2, ch)  # (G', D', H')
    v = _pick(block.v, 0, plan.kv_heads, plan.v_dims).index_select(2, ch)
    o = _pick(block.o, 1, plan.heads, plan.v_dims).index_select(0, ch)  # (H', N', D')

    def bias(b: Tensor | None, heads: Tensor, dims: Tensor | None) -> Tensor | None:
        return None if b is None else _pick(b, 0, heads, dims)

    q_bias = bias(block.q_bias, plan.heads, plan.qk_dims)
    if plan.query_scale != 1.0:
        q = q * plan.query_scale
        q_bias = None if q_bias is None else q_bias * plan.query_scale
    return BlockWeights(
        q=q,
        k=k,
        v=v,
        o=o,
        q_bias=q_bias,
        k_bias=bias(block.k_bias, plan.kv_heads, plan.qk_dims),
        v_bias=bias(block.v_bias, plan.kv_heads, plan.v_dims),
        mlp_in={n: w.index_select(0, neurons).index_select(1, ch) for n, w in block.mlp_in.items()},
        mlp_in_bias={n: b.index_select(0, neurons) for n, b in block.mlp_in_bias.items()},
        mlp_out=block.mlp_out.index_select(0, ch).index_select(1, neurons),
        vectors={n: t.index_select(0, ch) for n, t in block.vectors.items()},
    )


def _cut_state(
    layout: Layout, sd: StateDict, blocks: dict[int, BlockWeights], plans: list[_LayerPlan], channels: Tensor
) -> dict[str, Tensor]:
    """The student's state dict: each kept block sliced and renumbered, the embeddings, head and final
    norm cut to the kept hidden channels."""
    out: dict[str, Tensor] = {}
    for target, plan in enumerate(plans):
        block = _slice_block(blocks[plan.source], plan, channels)
        out.update(layout.write_block(block, f"{layout.blocks}.{target}."))
    for name in layout.matrices:
        if name in sd:
            out[name] = sd[name].index_select(1, channels.to(sd[name].device))  # (V, H')
    for name in layout.final_vectors:
        if name in sd:
            out[name] = sd[name].index_select(0, channels.to(sd[name].device))  # (H',)
    return out


# -- building the student and the report --------------------------------------------------------------


def _build(teacher: PreTrainedModel, config: PretrainedConfig, state: dict[str, Tensor]) -> PreTrainedModel:
    """A model of the teacher's class from ``config``, holding exactly ``state``, like the teacher placed."""
    param = next(teacher.parameters())
    with no_init_weights(), torch.device(param.device):
        student = type(teacher)._from_config(
            config, dtype=param.dtype, attn_implementation=teacher.config._attn_implementation
        )
    student.tie_weights()  # no_init_weights skips the tying that init_weights does
    expected = set(student.state_dict())
    if expected != set(state):
        raise RuntimeError(
            f"cut state dict does not match the student: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    student.load_state_dict(state, strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)  # generate as the teacher does
    return student.eval()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kept_share(width: Scores, plans: list[_LayerPlan], channels: Tensor) -> dict[str, float]:
    """Share of the (summed) importance of heads, MLP channels and hidden channels that the cut keeps."""
    head_total = sum(float(s.heads.sum()) for s in width.layers)
    head_kept = sum(
        float(_pick(s.heads, 0, p.heads, p.v_dims).sum()) for s, p in zip(width.layers, plans, strict=True)
    )
    neuron_total = sum(float(s.neurons.sum()) for s in width.layers)
    neuron_kept = sum(
        float(s.neurons[p.neurons.to(s.neurons.device)].sum())
        for s, p in zip(width.layers, plans, strict=True)
    )
    channel_scores = width.channels + sum(s.channels for s in width.layers)
    return {
        "heads": head_kept / head_total if head_total else 1.0,
        "neurons": neuron_kept / neuron_total if neuron_total else 1.0,
        "channels": float(channel_scores[channels.to(channel_scores.device)].sum() / channel_scores.sum())
        if float(channel_scores.sum())
        else 1.0,
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"
