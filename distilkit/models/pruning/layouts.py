"""Where each supported family keeps its weights, for cutting a student from a teacher.

A layout reads one transformer block from a state dict into :class:`BlockWeights`, the same shapes for
every family, and writes such weights back under the family's own parameter names, so that ranking and
slicing (:mod:`distilkit.models.pruning.cut`) are written once. Reading and writing are pure reshapes and
transposes: a block read and written back is bit-identical.

Letters in shapes: H hidden channels, N query heads, G key/value heads (N for gpt2 and gpt_neox), D head
dimension, I MLP channels, V vocabulary rows.

Families and their quirks:

* ``gpt2``: ``Conv1D`` weights stored as (in, out); one fused ``c_attn`` of [q | k | v], each (N·D);
  D = n_embd / n_head, so a cut width with the same head count also cuts D.
* ``llama`` and ``qwen2``: separate q/k/v/o projections, grouped-query attention, a gated MLP
  (gate, up, down), RMSNorm without bias; qwen2 has q/k/v biases. ``head_dim`` is a config field and is
  kept.
* ``gpt_neox``: one fused ``query_key_value`` laid out per head as [q | k | v] (N, 3, D); rotary
  embeddings over the first ``partial_rotary_factor`` · D dimensions of each head; D = hidden_size /
  num_attention_heads like gpt2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig

StateDict = Mapping[str, Tensor]
Biases = tuple[Tensor | None, Tensor | None, Tensor | None]
Attention = tuple[Tensor, Tensor, Tensor, Tensor, Biases]  # q, k, v, o and the q/k/v biases


@dataclasses.dataclass
class BlockWeights:
    """One block's weights in a layout shared by every family (matrices as (out, in)).

    Attributes:
        q: (N, D, H) query projection, per head and head dimension.
        k: (G, D, H) key projection.
        v: (G, D, H) value projection.
        o: (H, N, D) attention output projection.
        mlp_in: MLP input projections by parameter name, each (I, H) (gpt2/gpt_neox: one; llama: gate, up).
        mlp_out: (H, I) MLP output projection.
        vectors: every (H,) tensor of the block by parameter name: norm weights and biases, output biases.
        q_bias: (N, D) or None; k_bias, v_bias: (G, D) or None.
        mlp_in_bias: (I,) biases of the MLP input projections by parameter name.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    mlp_in: dict[str, Tensor]
    mlp_out: Tensor
    vectors: dict[str, Tensor]
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    mlp_in_bias: dict[str, Tensor] = dataclasses.field(default_factory=dict)


class Layout:
    """A family's parameter names and module paths; subclasses fill in the attention layout.

    Attributes:
        fields: the config field of each size role (``None`` where the family has no such field).
        blocks: path of the ``ModuleList`` of blocks.
        attn_qkv: the fused qkv projection inside a block (families that cut D); attn_out: the attention
            output projection.
        mlp_in / mlp_out: the MLP projections inside a block (weights and biases by their names).
        norms: the block's norm modules; final_norm: the last norm before the head (full path).
        vectors: every (H,) parameter of a block (norm weights and biases, output biases) that may exist.
        matrices: every model-level (V, H) parameter: embeddings and the LM head.
        final_vectors: the final norm's parameters.
        conv1d: matrices are stored as (in, out) (GPT-2's ``Conv1D``).
        cuts_head_dim: the head dimension follows from the width (D = H / N), so a cut may shrink it.
    """

    model_types: tuple[str, ...] = ()
    fields: dict[str, str | None] = {}
    blocks = ""
    attn_qkv = ""
    attn_out = ""
    mlp_in: tuple[str, ...] = ()
    mlp_out = ""
    norms: tuple[str, ...] = ()
    final_norm = ""
    vectors: tuple[str, ...] = ()
    matrices: tuple[str, ...] = ()
    final_vectors: tuple[str, ...] = ()
    conv1d = False
    cuts_head_dim = False

    # -- sizes and config -------------------------------------------------------------------------

    def sizes(self, config: PretrainedConfig) -> dict[str, int]:
        """The teacher's size of every role (``kv_heads`` equals ``heads`` without grouped queries)."""
        out = {role: int(getattr(config, name)) for role, name in self.fields.items() if name is not None}
        out.setdefault("kv_heads", out["heads"])
        return out

    def head_dim(self, config: PretrainedConfig) -> int:
        """D: the per-head dimension of the attention."""
        return int(config.hidden_size // config.num_attention_heads)

    def rotary_dims(self, config: PretrainedConfig) -> int:
        """How many leading dimensions of each query/key head carry rotary embeddings (kept whole)."""
        return 0

    def new_config(
        self, config: PretrainedConfig, sizes: Mapping[str, int], layers: list[int]
    ) -> PretrainedConfig:
        """The student's config: the teacher's with the cut sizes (and what follows from them)."""
        values = config.to_dict()
        values.update({name: sizes[role] for role, name in self.fields.items() if name is not None})
        layer_types = values.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == config.num_hidden_layers:
            values["layer_types"] = [layer_types[i] for i in layers]  # qwen2: sliding-window layers
        values.update(self.extra_config(config, sizes))
        values["_name_or_path"] = ""
        return type(config).from_dict(values)

    def extra_config(self, config: PretrainedConfig, sizes: Mapping[str, int]) -> dict[str, Any]:
        """Config fields that must change along with the sizes (none by default)."""
        return {}

    def query_scale(
        self, config: PretrainedConfig, source: int, target: int, old_dim: int, new_dim: int
    ) -> float:
        """Factor on the query weights that keeps each kept q·k term's scale, so attention scores equal
        the teacher's minus the dropped dimensions' terms: the scaling is D^-1/2 and becomes D'^-1/2."""
        return (new_dim / old_dim) ** 0.5

    # -- reading and writing ------------------------------------------------------------------------

    def matrix(self, weight: Tensor) -> Tensor:
        """A stored weight as (out, in)."""
        return weight.t() if self.conv1d else weight

    def stored(self, weight: Tensor) -> Tensor:
        """An (out, in) weight as the family stores it."""
        return weight.t().contiguous() if self.conv1d else weight.contiguous()

    def read_block(self, sd: StateDict, prefix: str, head_dim: int) -> BlockWeights:
        """Block ``prefix`` (e.g. ``"transformer.h.3."``) of ``sd`` in the shared layout."""
        q, k, v, o, biases = self.read_attention(sd, prefix, head_dim)
        return BlockWeights(
            q=q,
            k=k,
            v=v,
            o=o,
            q_bias=biases[0],
            k_bias=biases[1],
            v_bias=biases[2],
            mlp_in={name: self.matrix(sd[prefix + name + ".weight"]) for name in self.mlp_in},
            mlp_in_bias={
                name: sd[prefix + name + ".bias"] for name in self.mlp_in if prefix + name + ".bias" in sd
            },
            mlp_out=self.matrix(sd[prefix + self.mlp_out + ".weight"]),
            vectors={name: sd[prefix + name] for name in self.vectors if prefix + name in sd},
        )

    def write_block(self, block: BlockWeights, prefix: str) -> dict[str, Tensor]:
        """``block`` under the family's parameter names, with ``prefix``."""
        out = self.write_attention(block, prefix)
        for name, weight in block.mlp_in.items():
            out[prefix + name + ".weight"] = self.stored(weight)
        for name, bias in block.mlp_in_bias.items():
            out[prefix + name + ".bias"] = bias.contiguous()
        out[prefix + self.mlp_out + ".weight"] = self.stored(block.mlp_out)
        out.update({prefix + name: t.contiguous() for name, t in block.vectors.items()})
        return out

    def read_attention(self, sd: StateDict, prefix: str, head_dim: int) -> Attention:
        """q (N, D, H), k (G, D, H), v (G, D, H), o (H, N, D) and the q/k/v biases or None."""
        raise NotImplementedError

    def write_attention(self, block: BlockWeights, prefix: str) -> dict[str, Tensor]:
        """The attention weights of ``block`` under the family's names."""
        raise NotImplementedError

    def split_qk(self, qkv_out: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
        """Queries and keys (..., N, D) from the output of the fused qkv projection (families that cut D)."""
        raise NotImplementedError


class GPT2Layout(Layout):
    model_types = ("gpt2",)
    fields = {
        "layers": "n_layer",
        "hidden": "n_embd",
        "heads": "n_head",
        "kv_heads": None,
        "inner": "n_inner",
    }
    blocks = "transformer.h"
    attn_qkv = "attn.c_attn"
    attn_out = "attn.c_proj"
    mlp_in = ("mlp.c_fc",)
    mlp_out = "mlp.c_proj"
    norms = ("ln_1", "ln_2")
    final_norm = "transformer.ln_f"
    vectors = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.bias", "mlp.c_proj.bias")
    matrices = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")
    final_vectors = ("transformer.ln_f.weight", "transformer.ln_f.bias")
    conv1d = True
    cuts_head_dim = True

    def sizes(self, config: PretrainedConfig) -> dict[str, int]:
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        return {
            "layers": config.n_layer,
            "hidden": config.n_embd,
            "heads": config.n_head,
            "kv_heads": config.n_head,
            "inner": int(inner),
        }

    def query_scale(
        self, config: PretrainedConfig, source: int, target: int, old_dim: int, new_dim: int
    ) -> float:
        """As the base class when ``scale_attn_weights``; with ``scale_attn_by_inverse_layer_idx`` the
        scores are also divided by (block index + 1), which changes when blocks are dropped."""
        scale = (
            super().query_scale(config, source, target, old_dim, new_dim)
            if config.scale_attn_weights
            else 1.0
        )
        if config.scale_attn_by_inverse_layer_idx:
            scale *= (target + 1) / (source + 1)
        return scale

    def read_attention(self, sd: StateDict, prefix: str, head_dim: int) -> Attention:
        qkv = self.matrix(sd[prefix + "attn.c_attn.weight"])  # (3·N·D, H)
        q, k, v = (w.unflatten(0, (-1, head_dim)) for w in qkv.chunk(3, dim=0))  # (N, D, H) each
        bias = sd.get(prefix + "attn.c_attn.bias")
        biases: Biases = (None, None, None)
        if bias is not None:
            bq, bk, bv = (b.unflatten(0, (-1, head_dim)) for b in bias.chunk(3))  # (N, D) each
            biases = (bq, bk, bv)
        o = self.matrix(sd[prefix + "attn.c_proj.weight"]).unflatten(1, (-1, head_dim))  # (H, N, D)
        return q, k, v, o, biases

    def write_attention(self, block: BlockWeights, prefix: str) -> dict[str, Tensor]:
        qkv = torch.cat([block.q.flatten(0, 1), block.k.flatten(0, 1), block.v.flatten(0, 1)])  # (3·N·D, H)
        out = {prefix + "attn.c_attn.weight": self.stored(qkv)}
        if block.q_bias is not None and block.k_bias is not None and block.v_bias is not None:
            out[prefix + "attn.c_attn.bias"] = torch.cat(
                [b.flatten() for b in (block.q_bias, block.k_bias, block.v_bias)]
            )
        out[prefix + "attn.c_proj.weight"] = self.stored(block.o.flatten(1))  # (H, N·D) stored as (N·D, H)
        return out

    def split_qk(self, qkv_out: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
        q, k, _ = qkv_out.chunk(3, dim=-1)  # (..., N·D) each
        return q.unflatten(-1, (-1, head_dim)), k.unflatten(-1, (-1, head_dim))


class LlamaLayout(Layout):
    model_types = ("llama", "qwen2")
    fields = {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "inner": "intermediate_size",
    }
    blocks = "model.layers"
    attn_out = "self_attn.o_proj"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    norms = ("input_layernorm", "post_attention_layernorm")
    final_norm = "model.norm"
    vectors = (
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.o_proj.bias",
        "mlp.down_proj.bias",
    )
    matrices = ("model.embed_tokens.weight", "lm_head.weight")
    final_vectors = ("model.norm.weight",)

    def head_dim(self, config: PretrainedConfig) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def extra_config(self, config: PretrainedConfig, sizes: Mapping[str, int]) -> dict[str, Any]:
        return {"head_dim": self.head_dim(config)}  # kept, whatever the new hidden size

    def read_attention(self, sd: StateDict, prefix: str, head_dim: int) -> Attention:
        p = prefix + "self_attn."
        q, k, v = (sd[f"{p}{n}_proj.weight"].unflatten(0, (-1, head_dim)) for n in "qkv")  # (N|G, D, H)

        def bias(n: str) -> Tensor | None:
            b = sd.get(f"{p}{n}_proj.bias")
            return None if b is None else b.unflatten(0, (-1, head_dim))  # (N|G, D)

        biases = (bias("q"), bias("k"), bias("v"))
        o = sd[p + "o_proj.weight"].unflatten(1, (-1, head_dim))  # (H, N, D)
        return q, k, v, o, biases

    def write_attention(self, block: BlockWeights, prefix: str) -> dict[str, Tensor]:
        p = prefix + "self_attn."
        out = {
            f"{p}{n}_proj.weight": w.flatten(0, 1).contiguous()
            for n, w in zip("qkv", (block.q, block.k, block.v), strict=True)
        }
        for n, b in zip("qkv", (block.q_bias, block.k_bias, block.v_bias), strict=True):
            if b is not None:
                out[f"{p}{n}_proj.bias"] = b.flatten().contiguous()
        out[p + "o_proj.weight"] = block.o.flatten(1).contiguous()  # (H, N·D)
        return out


class GPTNeoXLayout(Layout):
    model_types = ("gpt_neox",)
    fields = {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": None,
        "inner": "intermediate_size",
    }
    blocks = "gpt_neox.layers"
    attn_qkv = "attention.query_key_value"
    attn_out = "attention.dense"
    mlp_in = ("mlp.dense_h_to_4h",)
    mlp_out = "mlp.dense_4h_to_h"
    norms = ("input_layernorm", "post_attention_layernorm")
    final_norm = "gpt_neox.final_layer_norm"
    vectors = (
        "input_layernorm.weight",
        "input_layernorm.bias",
        "post_attention_layernorm.weight",
        "post_attention_layernorm.bias",
        "attention.dense.bias",
        "mlp.dense_4h_to_h.bias",
    )
    matrices = ("gpt_neox.embed_in.weight", "lm_head.weight")
    final_vectors = ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias")
    cuts_head_dim = True

    def rotary_dims(self, config: PretrainedConfig) -> int:
        factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        return int(self.head_dim(config) * factor)

    def extra_config(self, config: PretrainedConfig, sizes: Mapping[str, int]) -> dict[str, Any]:
        """Keep the number of rotary dimensions per head: the factor becomes R / D' for the new D'."""
        rotary, new_dim = self.rotary_dims(config), sizes["hidden"] // sizes["heads"]
        rope = dict(config.rope_parameters)
        if new_dim != self.head_dim(config):
            rope["partial_rotary_factor"] = rotary / new_dim
        return {"rope_parameters": rope}

    def read_attention(self, sd: StateDict, prefix: str, head_dim: int) -> Attention:
        p = prefix + "attention."
        q, k, v = sd[p + "query_key_value.weight"].unflatten(0, (-1, 3, head_dim)).unbind(1)  # (N, D, H) each
        bias = sd.get(p + "query_key_value.bias")
        biases: Biases = (None, None, None)
        if bias is not None:
            bq, bk, bv = bias.unflatten(0, (-1, 3, head_dim)).unbind(1)  # (N, D) each
            biases = (bq, bk, bv)
        o = sd[p + "dense.weight"].unflatten(1, (-1, head_dim))  # (H, N, D)
        return q, k, v, o, biases

    def write_attention(self, block: BlockWeights, prefix: str) -> dict[str, Tensor]:
        p = prefix + "attention."
        qkv = torch.stack([block.q, block.k, block.v], dim=1)  # (N, 3, D, H)
        out = {p + "query_key_value.weight": qkv.flatten(0, 2).contiguous()}  # (N·3·D, H)
        if block.q_bias is not None and block.k_bias is not None and block.v_bias is not None:
            bias = torch.stack([block.q_bias, block.k_bias, block.v_bias], dim=1)  # (N, 3, D)
            out[p + "query_key_value.bias"] = bias.flatten().contiguous()
        out[p + "dense.weight"] = block.o.flatten(1).contiguous()  # (H, N·D)
        return out

    def split_qk(self, qkv_out: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
        qkv = qkv_out.unflatten(-1, (-1, 3, head_dim))  # (..., N, 3, D)
        return qkv[..., 0, :], qkv[..., 1, :]


LAYOUTS: tuple[Layout, ...] = (GPT2Layout(), LlamaLayout(), GPTNeoXLayout())


def layout_for(model_type: str) -> Layout | None:
    """The layout of ``model_type``, or None when cutting does not support it."""
    return next((layout for layout in LAYOUTS if model_type in layout.model_types), None)


def supported_model_types() -> list[str]:
    """Every model_type that can be cut."""
    return [t for layout in LAYOUTS for t in layout.model_types]
