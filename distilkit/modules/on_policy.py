"""On-policy distillation (GKD): the student also learns on continuations it samples itself.

Training on fixed text teaches the student to continue text of the data's kind, but at generation time it
continues its own text, and its mistakes compound (exposure bias). On-policy distillation (Agarwal et al.
2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes") samples
continuations from the student and trains it on the teacher's distribution at those tokens.
:class:`OnPolicyDistillationModule` does that on a fraction ``lmbda`` of the steps; the other steps are
the ordinary KD of :class:`~distilkit.DistillationModule` on the data.

Every random choice is a pure function of the run's seed and where the run is: whether a step samples is
decided by a hash of ``(seed, global step)`` and each sample is drawn from a ``torch.Generator`` seeded by
a hash of ``(seed, global step, batch index, rank)``. A resumed run therefore samples exactly what the
uninterrupted run samples without any extra state in the checkpoint, and the global random state (dropout)
is never touched by sampling.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distilkit.batch import IGNORE_INDEX, Batch, next_token_targets
from distilkit.errors import ConfigError, check_range
from distilkit.losses import DistillationLoss, GeneralizedJSDLoss
from distilkit.losses.chunked import chunk_slices
from distilkit.models.generation import SAMPLERS, Sampled, Sampler, sample_with
from distilkit.models.loading import ModelSpec
from distilkit.modules.distillation import DistillationModule
from distilkit.run.loggers import wandb_loggers

#: Rows of the W&B ``on_policy_samples`` table added at each validation.
TABLE_ROWS = 4


def stream_seed(*parts: object) -> int:
    """A 63-bit seed hashed from ``parts`` (e.g. ``(seed, "sample", step, batch_idx, rank)``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prompts_of(batch: Batch, prompt_tokens: int) -> tuple[Tensor, Tensor]:
    """The first ``prompt_tokens`` of each block as left-padded prompts: ``(B, P)`` ids and mask.

    A block's tail may be padding (the last, partial block of a split); its real tokens are moved to the
    right end of the prompt, in order, so that the prompt is left-padded as sampling requires.
    """
    ids = batch["input_ids"][:, :prompt_tokens]  # (B, P)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask[:, :prompt_tokens]
    order = mask.argsort(dim=1, stable=True)  # (B, P): padding first, then the real tokens in order
    return ids.gather(1, order), mask.gather(1, order)


def training_batch(sampled: Sampled) -> dict[str, Tensor]:
    """A :class:`Sampled` batch in the data's layout: each row starts with its first real token (so the
    positions are those the sampler used) and ends in padding; labels score the sampled tokens only.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, P + N)``; labels are
        :data:`IGNORE_INDEX` on the prompt, after an EOS and on padding.
    """
    mask = sampled.attention_mask
    order = (mask == 0).long().argsort(dim=1, stable=True)  # (B, P + N): real tokens first, in order
    labels = sampled.labels(IGNORE_INDEX)
    return {
        "input_ids": sampled.tokens.gather(1, order),
        "attention_mask": mask.gather(1, order),
        "labels": labels.gather(1, order),
    }


def bigram_codes(batch: Batch, vocab_size: int) -> Tensor:
    """``(M,)`` one code ``a·V + b`` per pair of consecutive labelled tokens ``(a, b)`` of a
    :func:`training_batch` (the bigrams of the samples, none spanning the prompt)."""
    labels = batch["labels"]
    both = (labels[:, :-1] != IGNORE_INDEX) & (labels[:, 1:] != IGNORE_INDEX)  # (B, L-1)
    return (labels[:, :-1] * vocab_size + labels[:, 1:])[both]


class OnPolicyDistillationModule(DistillationModule):
    """Distillation on data and on sampled continuations (GKD): on a fraction ``lmbda`` of the steps the
    student continues a prompt from each block and learns the teacher's distribution at the sampled tokens.

    An on-policy step takes the first ``prompt_tokens`` of each block as a prompt, samples up to
    ``max_new_tokens`` with the ``sampler`` (KV cache, whole batch at once, eval mode and no gradient, the
    student's dropout restored afterwards), runs teacher and student on prompt + sample and applies the
    divergence to the sampled positions only (the prompt and everything after an EOS are masked): the
    total on such a step is the KD term alone, as in GKD (the CE of the student on its own samples is
    logged but weighted 0). The other steps are the parent's ``(1 − kd_ratio)·CE + kd_ratio·KD`` on the
    data; with ``lmbda = 0`` the module trains exactly as :class:`~distilkit.DistillationModule`.

    The choice is made per step (all sequences of a step are sampled or none are): a step then runs one
    batch of one shape, every process of a DDP run agrees on the kind of step (the decision hashes
    ``(seed, step)``; each process samples its own share with its own stream), and ``lmbda`` is the
    fraction of steps, as in TRL's ``GKDTrainer``.

    ``sampler``: ``student`` (on-policy), ``teacher`` (on-the-fly sequence-level KD, Kim & Rush 2016) or
    ``mixed`` (Speculative KD, Xu et al. 2025: the student proposes, the teacher keeps a proposal inside
    its top-``referee_top_k`` and otherwise samples its own token).

    Logs ``train/on_policy`` (1.0 on a sampled step), ``train/generation_share`` (share of the step's wall
    time spent sampling) and, at each validation, on the first ``prompt_tokens`` of up to ``val_samples``
    validation blocks sampled by the student: ``val/sample_teacher_nll`` (mean NLL per sampled token
    under the teacher: lower means the student writes what the teacher would) and ``val/sample_distinct2``
    (distinct bigrams over all bigrams of the samples: a repetitive student shows). A few samples go to the
    W&B table ``on_policy_samples`` when a W&B logger is present.

    A random-init student samples noise, and its on-policy gradient is then small next to a data step's
    (about 1/25 of its norm at initialisation, 1/4 after 300 data steps on the quickstart):
    ``off_policy_steps`` makes the first steps all KD on the data (a warm-up), and ``lmbda`` applies from
    then on, under the same learning-rate schedule (a ``CurriculumCallback`` stage with
    ``knobs: {lmbda: ...}`` does the same but owns the learning rate).

    Args:
        lmbda: fraction of on-policy steps, in [0, 1] (a curriculum knob).
        off_policy_steps: global steps, from the start, that are all off-policy before ``lmbda`` applies.
        prompt_tokens: tokens of each block used as the prompt.
        max_new_tokens: tokens sampled after each prompt (capped by the context length).
        temperature: sampling temperature (> 0).
        top_p: nucleus mass in (0, 1].
        sampler: ``student``, ``teacher`` or ``mixed``.
        referee_top_k: K of the mixed sampler.
        val_samples: validation prompts sampled at each validation, over all processes (0: none).
        seed: seeds every random choice; default the run's seed (``seed_everything``), else 0.
        loss: the divergence (default ``GeneralizedJSDLoss(beta=0.5)``, as GKD).
        student, teacher: as for :class:`~distilkit.DistillationModule`; a teacher is required.
        **kwargs: the other arguments of :class:`~distilkit.DistillationModule`.
    """

    knobs: ClassVar[tuple[str, ...]] = ("kd_ratio", "lmbda")

    def __init__(
        self,
        student: ModelSpec,
        teacher: ModelSpec | None = None,
        *,
        lmbda: float = 0.5,
        off_policy_steps: int = 0,
        prompt_tokens: int = 32,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        sampler: Sampler = "student",
        referee_top_k: int = 25,
        val_samples: int = 64,
        seed: int | None = None,
        loss: DistillationLoss | None = None,
        **kwargs: Any,
    ) -> None:
        loss = loss if loss is not None else GeneralizedJSDLoss(beta=0.5)
        super().__init__(student, teacher, loss=loss, **kwargs)
        if self.teacher is None:
            raise ConfigError("model.teacher", None, "is needed to score samples", "give a teacher model")
        self.lmbda = lmbda
        if off_policy_steps < 0:
            raise ConfigError("model.off_policy_steps", off_policy_steps, "must be >= 0", "use 0 for none")
        self.off_policy_steps = off_policy_steps
        _check_settings(
            prompt_tokens, max_new_tokens, temperature, top_p, sampler, referee_top_k, val_samples
        )
        block = kwargs.get("block_size")
        if block is not None and prompt_tokens >= block:
            raise ConfigError(
                "model.prompt_tokens", prompt_tokens, f"leaves no room in blocks of {block}", "shorten"
            )
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.temperature, self.top_p, self.sampler = temperature, top_p, sampler
        self.referee_top_k, self.val_samples, self.seed = referee_top_k, val_samples, seed
        eos = kwargs.get("eos_token_id")
        config = getattr(self.student, "config", None)
        self.eos_token_id: int | None = eos if eos is not None else getattr(config, "eos_token_id", None)
        self._clock: dict[str, float] = {}
        self._val: dict[str, Any] = {}
        self._table: list[list[Any]] = []

    @property
    def lmbda(self) -> float:
        return self._lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self._lmbda = check_range("model.lmbda", value, 0.0, 1.0)

    # ------------------------------------------------------------------------------------------ sampling
    def run_seed(self) -> int:
        """``seed``, else the seed of ``seed_everything`` (``PL_GLOBAL_SEED``), else 0."""
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0"))

    def is_on_policy(self, step: int) -> bool:
        """Whether global step ``step`` samples: none of the first ``off_policy_steps``; after them, a uniform
        draw hashed from ``(seed, step)`` below ``lmbda`` (the same on every process)."""
        if step < self.off_policy_steps:
            return False
        return stream_seed(self.run_seed(), "on_policy", step) / 2**63 < self.lmbda

    def sampling_generator(self, *where: object) -> torch.Generator:
        """The random stream of one sampling call, seeded by ``(seed, *where, rank)``, on the model's
        device."""
        generator = torch.Generator(device=self.device)
        return generator.manual_seed(stream_seed(self.run_seed(), *where, self.global_rank))

    def sample(self, batch: Batch, generator: torch.Generator, sampler: Sampler | None = None) -> Sampled:
        """Continue the first ``prompt_tokens`` of each block of ``batch`` with ``sampler`` (default the
        module's): ``(B, P + N)`` tokens and masks (see :class:`~distilkit.models.generation.Sampled`)."""
        ids, mask = prompts_of(batch, self.prompt_tokens)
        return sample_with(
            sampler or self.sampler,
            self.student,
            self.teacher,
            ids,
            mask,
            referee_top_k=self.referee_top_k if (sampler or self.sampler) == "mixed" else None,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            eos_token_id=self.eos_token_id,
            generator=generator,
        )

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        """On a sampled step, train on :func:`training_batch` of the samples; else the parent's step."""
        on_policy = self.is_on_policy(self.global_step)
        self.log("train/on_policy", float(on_policy), batch_size=batch["input_ids"].shape[0])
        if not on_policy:
            return super().training_step(batch, batch_idx)
        start = _now(self.device)
        batch = training_batch(
            self.sample(batch, self.sampling_generator("sample", self.global_step, batch_idx))
        )
        self._clock["generation"] = _now(self.device) - start
        return self.training_loss(batch, self.sampled_weights())

    def sampled_weights(self) -> dict[str, float]:
        """The weights of a sampled step's terms: the divergence alone, as GKD (the CE of the student on its
        own samples is logged, weighted 0)."""
        return {"ce_loss": 0.0, "kd_loss": 1.0}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Start the clock of a sampled step (other steps are not timed: no device sync)."""
        self._clock = {"start": _now(self.device)} if self.is_on_policy(self.global_step) else {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log ``train/generation_share``: sampling seconds over the step's (0 on a step without sampling)."""
        share = 0.0
        if "generation" in self._clock:
            share = self._clock["generation"] / max(_now(self.device) - self._clock["start"], 1e-9)
        self.log("train/generation_share", share, batch_size=1)

    # ---------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        share = math.ceil(self.val_samples / max(self.trainer.world_size, 1))
        self._val = {"wanted": share, "nll": 0.0, "tokens": 0, "codes": [], "rows": []}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        wanted = self._val.get("wanted", 0)
        if wanted > 0 and not self.trainer.sanity_checking:
            rows = {key: value[:wanted] for key, value in batch.items()}
            self._score_samples(rows, self.sampling_generator("validation", batch_idx))
            self._val["wanted"] = wanted - rows["input_ids"].shape[0]

    def _score_samples(self, batch: Batch, generator: torch.Generator) -> None:
        """Sample with the student; add the teacher's NLL of the sampled tokens and their bigrams."""
        sampled = training_batch(self.sample(batch, generator, sampler="student"))
        keep, targets = next_token_targets(sampled["labels"])  # (B, L-1), (N,)
        teaching = self.teacher_forward(sampled)
        assert teaching is not None  # on-policy needs a live teacher
        logits = teaching.at(keep)  # the teacher's (n, V) logits, chunk by chunk
        for rows in chunk_slices(targets.numel(), self.chunk_size):
            chunk = logits(rows)
            assert isinstance(chunk, Tensor)  # a live teacher's (n, V) logits
            self._val["nll"] += F.cross_entropy(chunk.float(), targets[rows], reduction="sum")
        self._val["tokens"] += targets.numel()
        self._val["codes"].append(bigram_codes(sampled, self.vocab_size))
        room = TABLE_ROWS - len(self._val["rows"])
        if room > 0:  # (prompt ids, sample ids) of the first rows, for the W&B table
            columns = [sampled[k][:room].tolist() for k in ("input_ids", "attention_mask", "labels")]
            for ids, mask, labels in zip(*columns, strict=True):
                prompt = [t for t, m, y in zip(ids, mask, labels, strict=True) if m and y == IGNORE_INDEX]
                self._val["rows"].append((prompt, [y for y in labels if y != IGNORE_INDEX]))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/sample_teacher_nll`` and ``val/sample_distinct2`` over every process's samples."""
        super().on_validation_epoch_end()  # val/<domain>/ppl
        if self.trainer.sanity_checking or not self._val or self.val_samples == 0:
            return  # the same answer on every process: what follows are collectives
        reduce = self.trainer.strategy.reduce
        sums = torch.tensor([float(self._val["nll"]), float(self._val["tokens"])], device=self.device)
        nll, tokens = reduce(sums, reduce_op="sum").tolist()
        if tokens > 0:
            self.log("val/sample_teacher_nll", nll / tokens)
        codes = self._gathered_codes()
        if codes.numel() > 0:
            self.log("val/sample_distinct2", codes.unique().numel() / codes.numel())
        self._log_table()

    def _gathered_codes(self) -> Tensor:
        """Every process's bigram codes: padded to a common size with -1, all-gathered, padding dropped."""
        capacity = math.ceil(self.val_samples / max(self.trainer.world_size, 1)) * self.max_new_tokens
        local = torch.cat([c.long() for c in self._val["codes"]]) if self._val["codes"] else None
        padded = torch.full((capacity,), -1, dtype=torch.long, device=self.device)  # (C,)
        if local is not None:
            padded[: local.numel()] = local[:capacity]
        gathered: Tensor = self.all_gather(padded).reshape(-1)  # type: ignore[union-attr]  # (W·C,)
        return gathered[gathered >= 0]

    def _log_table(self) -> None:
        """Append a few ``(step, prompt, sample)`` rows to the W&B table ``on_policy_samples``."""
        loggers = wandb_loggers(self.trainer)
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if not loggers or tokenizer is None or not self.trainer.is_global_zero:
            return
        for prompt, sample in self._val["rows"]:
            self._table.append([self.global_step, tokenizer.decode(prompt), tokenizer.decode(sample)])
        for logger in loggers:
            logger.log_table(key="on_policy_samples", columns=["step", "prompt", "sample"], data=self._table)

    # ------------------------------------------------------------------------------------------- hooks
    def configure_model(self) -> None:
        """Refuse FSDP2: each process stops sampling at its own EOS, which sharded forwards cannot do."""
        super().configure_model()
        if self._shard_group is not None:
            raise ConfigError(
                "trainer.strategy",
                "ModelParallelStrategy",
                "cannot run on-policy sampling (the processes' sampling loops end at different steps)",
                "use strategy: ddp",
            )


def _now(device: torch.device) -> float:
    """Wall-clock seconds, after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _check_settings(
    prompt_tokens: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    sampler: str,
    referee_top_k: int,
    val_samples: int,
) -> None:
    for field, value in (("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ConfigError(f"model.{field}", value, "must be >= 1", "use e.g. 32")
    check_range("model.temperature", temperature, 0.0, math.inf, open_low=True)
    check_range("model.top_p", top_p, 0.0, 1.0, open_low=True)
    if sampler not in SAMPLERS:
        raise ConfigError("model.sampler", sampler, f"must be one of {', '.join(SAMPLERS)}", "pick one")
    if referee_top_k < 1:
        raise ConfigError("model.referee_top_k", referee_top_k, "must be >= 1", "choose K such as 25")
    if val_samples < 0:
        raise ConfigError("model.val_samples", val_samples, "must be >= 0", "use 0 to sample nothing")
