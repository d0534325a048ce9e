"""Sampling from causal LMs: the one key-value-cache loop that every sampler in distilkit shares.

``sample_tokens`` continues a batch of prompts token by token. The prompt is run once (the prefill) and
each later step feeds only the newest token, reusing the model's own key-value cache. Three samplers use
the same loop:

- ``student`` / ``teacher``: sample from one model (on-policy distillation samples the student; sampling
  the teacher on the fly is sequence-level KD, Kim & Rush 2016);
- ``mixed`` (Speculative KD, Xu et al. ICLR 2025): the student proposes each token; the teacher (the
  *referee*, run on the same prefix with its own cache) keeps the proposal when it lies in the teacher's
  top-K at that position and otherwise replaces it with a token sampled from the teacher.

Each step turns logits ``l`` (B, V) into a token: greedy takes ``argmax(l)``; sampling draws from
``softmax(l / T)`` restricted to the nucleus (the smallest set of most likely tokens whose mass reaches
``top_p``, renormalised), with the exponential race ``argmax(p / E)``, ``E ~ Exp(1)`` i.i.d., which draws
exactly from ``p`` without the host sync of ``torch.multinomial``.

``generate_text`` is the text-level entry point (the ``generate`` command, the samples table).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distilkit.errors import ConfigError

Sampler = Literal["student", "teacher", "mixed"]
SAMPLERS: tuple[str, ...] = ("student", "teacher", "mixed")
STOP_CHECK_EVERY = 8  # steps between host-side "has every row ended?" checks (the only syncs of the loop)


@dataclass(frozen=True)
class Sampled:
    """A batch of prompts and their sampled continuations, right after the (left-padded) prompts.

    Attributes:
        tokens: ``(B, P + N)`` the prompts, then the sampled tokens; after a row's EOS, ``pad_token_id``.
            ``N <= max_new_tokens``: the loop stops once every row has ended.
        attention_mask: ``(B, P + N)`` 1 on real tokens (the prompt without its left padding, the sampled
            tokens up to and including EOS), 0 on padding on either side.
        generated_mask: ``(B, P + N)`` bool, true exactly at sampled positions up to and including EOS.
        prompt_length: ``P``, the padded prompt width.
        proposal_kept: mixed sampler only: ``(B, P + N)`` bool, true at sampled positions where the
            student's proposal was kept (inside the teacher's top-K); None for the other samplers.
    """

    tokens: Tensor
    attention_mask: Tensor
    generated_mask: Tensor
    prompt_length: int
    proposal_kept: Tensor | None = None

    @property
    def new_tokens(self) -> Tensor:
        """``(B, N)`` the sampled part of ``tokens``."""
        return self.tokens[:, self.prompt_length :]

    def labels(self, ignore_index: int = -100) -> Tensor:
        """``(B, P + N)`` causal-LM labels that score the sampled tokens only (prompt, padding ignored)."""
        return self.tokens.masked_fill(~self.generated_mask, ignore_index)


def sample_tokens(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    referee: nn.Module | None = None,
    referee_top_k: int | None = None,
) -> Sampled:
    """Continue a batch of prompts by sampling from ``model`` (and, given a ``referee``, the mixed sampler).

    Runs under ``torch.no_grad()`` with ``model`` (and ``referee``) in eval mode; each module's previous
    train/eval mode is restored afterwards.

    Args:
        model: a causal LM with a Hugging Face forward (``input_ids``, ``attention_mask``,
            ``position_ids``, a key-value cache, ``use_cache``).
        input_ids: ``(B, P)`` prompts; prompts of different lengths are left-padded.
        attention_mask: ``(B, P)`` 1 on prompt tokens, 0 on left padding; None: no padding. Each row
            samples exactly what it would sample alone (positions count from its first real token).
        max_new_tokens: tokens to sample at most, capped at the context length (``max_position_embeddings``
            or ``n_positions``; the smaller of the two models') minus ``P``.
        temperature: ``T > 0``; tokens are drawn from ``softmax(logits / T)``.
        top_p: nucleus mass in ``(0, 1]``; 1 keeps the whole vocabulary.
        greedy: take the most likely token (``temperature``, ``top_p`` and ``generator`` are unused).
        eos_token_id: the token(s) that end a row; what follows in that row is ``pad_token_id`` and
            masked. None: every row samples ``max_new_tokens`` tokens.
        pad_token_id: fills rows after their EOS; default the (first) EOS id, else 0.
        generator: the random stream, on the model's device; sampling is then reproducible under its seed
            and leaves the global RNG untouched. None: the global RNG of that device (``torch.manual_seed``
            reproduces).
        referee: the mixed sampler's teacher (same vocabulary); None for a single-model sampler.
        referee_top_k: K: a proposal is kept when the referee's logit for it is at least its K-th largest
            (ties kept). Otherwise the token is drawn from the referee with the same ``temperature`` and
            ``top_p`` (greedy: its argmax). Those draws come from a stream forked off ``generator`` (a
            seed hashed from its state), so the proposals use ``generator`` exactly as the student sampler
            does: with K = V, the mixed sampler returns the student sampler's tokens.

    Returns:
        A :class:`Sampled` batch on the model's device.

    Raises:
        ConfigError: on a bad setting, a prompt that is not left-padded or fills the context, or a
            referee whose vocabulary differs from the model's.
    """
    _check_settings(temperature, top_p, max_new_tokens, referee, referee_top_k)
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_prompts(input_ids, attention_mask)
    _check_generator(generator, device, greedy)
    prompt_length = input_ids.shape[1]
    steps = _budget([m for m in (model, referee) if m is not None], prompt_length, max_new_tokens)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    pick = _Picker(temperature, top_p, greedy)
    referee_generator = _fork(generator, device) if referee is not None and not greedy else None
    with _eval_mode(model, referee), torch.no_grad():
        return _sample_loop(
            _Decoder(model),
            _Decoder(referee) if referee is not None else None,
            referee_top_k,
            input_ids,
            attention_mask,
            steps,
            pick,
            eos,
            pad,
            generator,
            referee_generator,
        )


def sample_with(
    sampler: Sampler,
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    referee_top_k: int | None = None,
    **options: Any,
) -> Sampled:
    """Sample with one of the named samplers: ``student``, ``teacher`` or ``mixed`` (student proposes,
    the teacher keeps its top-``referee_top_k``). ``options`` go to :func:`sample_tokens`."""
    if sampler not in SAMPLERS:
        raise ConfigError("sampler", sampler, f"must be one of {', '.join(SAMPLERS)}", "pick one of those")
    if sampler != "student" and teacher is None:
        raise ConfigError("sampler", sampler, "needs a teacher", "give a teacher or use sampler: student")
    if sampler == "teacher":
        assert teacher is not None
        return sample_tokens(teacher, input_ids, attention_mask, **options)
    if sampler == "mixed":
        return sample_tokens(
            student, input_ids, attention_mask, referee=teacher, referee_top_k=referee_top_k, **options
        )
    return sample_tokens(student, input_ids, attention_mask, **options)


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Continue each text prompt in one batch; returns the completions (special tokens dropped).

    An empty prompt samples unconditionally, starting from the EOS token. Prompts are left-padded here
    (the tokenizer needs no pad token), so each continues as it would alone. Stops a row at the
    tokenizer's EOS; see :func:`sample_tokens` for the other arguments.
    """
    eos = tokenizer.eos_token_id
    texts = [prompt if prompt else tokenizer.eos_token for prompt in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    input_ids, attention_mask = left_pad(ids, pad, _device_of(model))
    sampled = sample_tokens(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
        eos_token_id=eos,
        pad_token_id=pad,
        generator=generator,
    )
    return tokenizer.batch_decode(sampled.new_tokens.tolist(), skip_special_tokens=True)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists -> ``(B, P)`` left-padded ids and their attention mask; an empty row is a ConfigError."""
    if not rows or any(len(row) == 0 for row in rows):
        raise ConfigError("prompts", "an empty token list", "has nothing to continue", "give >= 1 token")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def context_length(model: nn.Module) -> int | None:
    """The model's context length (``max_position_embeddings`` or ``n_positions``); None when unknown."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------- the loop


def _sample_loop(
    decoder: _Decoder,
    referee: _Decoder | None,
    top_k: int | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    steps: int,
    pick: _Picker,
    eos: Tensor | None,
    pad: int,
    generator: torch.Generator | None,
    referee_generator: torch.Generator | None,
) -> Sampled:
    """Prefill, then ``steps`` decode steps (fewer when every row has ended); all state stays on device."""
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    width = prompt_length + steps
    tokens = torch.full((batch, width), pad, dtype=torch.long, device=device)  # (B, P + N)
    tokens[:, :prompt_length] = input_ids
    running_mask = torch.ones((batch, width), dtype=attention_mask.dtype, device=device)  # (B, P + N)
    running_mask[:, :prompt_length] = attention_mask
    generated = torch.zeros((batch, steps), dtype=torch.bool, device=device)  # (B, N)
    kept = torch.zeros((batch, steps), dtype=torch.bool, device=device) if referee is not None else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)  # (B, P): 0 at each first real token
    logits = decoder.prefill(input_ids, attention_mask, positions)  # (B, V)
    referee_logits = referee.prefill(input_ids, attention_mask, positions) if referee else None
    if referee_logits is not None:
        _check_referee(logits, referee_logits, top_k)
    next_position = positions[:, -1:] + 1  # (B, 1)
    for step in range(steps):
        token = pick(logits, generator)  # (B,)
        if referee_logits is not None and kept is not None and top_k is not None:
            token, kept[:, step] = _referee_step(token, referee_logits, top_k, pick, referee_generator)
        token = token.masked_fill(finished, pad)
        generated[:, step] = ~finished
        tokens[:, prompt_length + step] = token
        if eos is not None:
            finished = finished | torch.isin(token, eos)
            if (step + 1) % STOP_CHECK_EVERY == 0 and bool(finished.all()):
                break
        if step + 1 == steps:
            break
        view = running_mask[:, : prompt_length + step + 1]  # (B, P + step + 1)
        logits = decoder.step(token[:, None], view, next_position)
        if referee is not None:
            referee_logits = referee.step(token[:, None], view, next_position)
        next_position = next_position + 1
    return _result(tokens, attention_mask, generated, kept, prompt_length)


def _referee_step(
    proposal: Tensor, referee_logits: Tensor, top_k: int, pick: _Picker, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Keep each proposal inside the referee's top-K, else take the referee's own sample: ``(B,)`` twice."""
    if top_k >= referee_logits.shape[-1]:
        keep = torch.ones_like(proposal, dtype=torch.bool)
    else:
        kth = referee_logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the K-th largest logit
        keep = (referee_logits.gather(1, proposal[:, None]) >= kth).squeeze(1)  # (B,)
    replacement = pick(referee_logits, generator)  # (B,)
    return torch.where(keep, proposal, replacement), keep


def _result(
    tokens: Tensor, prompt_mask: Tensor, generated: Tensor, kept: Tensor | None, prompt_length: int
) -> Sampled:
    """Trim to the longest row (one sync) and assemble the masks."""
    used = int(generated.sum(dim=1).max()) if generated.numel() else 0
    generated = generated[:, :used]  # (B, N)
    batch = tokens.shape[0]
    before = torch.zeros((batch, prompt_length), dtype=torch.bool, device=tokens.device)  # (B, P)
    generated_mask = torch.cat([before, generated], dim=1)  # (B, P + N)
    attention_mask = torch.cat([prompt_mask, generated.to(prompt_mask.dtype)], dim=1)  # (B, P + N)
    proposal_kept = torch.cat([before, kept[:, :used] & generated], dim=1) if kept is not None else None
    return Sampled(
        tokens[:, : prompt_length + used], attention_mask, generated_mask, prompt_length, proposal_kept
    )


class _Picker:
    """Logits ``(B, V)`` -> tokens ``(B,)``: greedy, or a draw from ``softmax(l / T)`` within the nucleus."""

    def __init__(self, temperature: float, top_p: float, greedy: bool) -> None:
        self.temperature, self.top_p, self.greedy = temperature, top_p, greedy

    def __call__(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)  # (B, V) float32
        if self.top_p >= 1.0:
            return _race(probs, generator)
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass of the likelier tokens
        sorted_probs.masked_fill_(mass_before >= self.top_p, 0.0)  # the top token always stays
        return order.gather(1, _race(sorted_probs, generator)[:, None]).squeeze(1)


def _race(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row from unnormalised ``probs`` ``(B, V)``: ``argmax(p / E)``, ``E ~ Exp(1)``.

    ``P(argmax = i) = p_i / sum(p)`` (the first of independent exponential clocks with rates ``p_i``
    rings at ``i``). ``probs`` is overwritten.
    """
    noise = torch.empty_like(probs).exponential_(generator=generator)  # (B, V)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


class _Decoder:
    """One model and its key-value cache: the prefill, then one token per step; returns ``(B, V)`` logits."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params
        self.cache: Any = None

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        return self._forward(input_ids, attention_mask, positions)

    def step(self, token: Tensor, attention_mask: Tensor, position: Tensor) -> Tensor:
        return self._forward(token, attention_mask, position)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        kwargs: dict[str, Any] = {self.cache_arg: self.cache, "use_cache": True}
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if self.cache is None:
            raise ConfigError(
                "model", type(self.model).__name__, "returned no key-value cache", "use a HF LM"
            )
        return out.logits[:, -1, :]  # (B, V)


# ------------------------------------------------------------------------------------------------ checks


def _check_settings(
    temperature: float, top_p: float, max_new_tokens: int, referee: nn.Module | None, top_k: int | None
) -> None:
    if not temperature > 0:
        raise ConfigError("temperature", temperature, "must be > 0", "use e.g. 1.0, or greedy for argmax")
    if not 0 < top_p <= 1:
        raise ConfigError("top_p", top_p, "must lie in (0, 1]", "use e.g. 0.95, or 1.0 for no nucleus")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", max_new_tokens, "must be >= 1", "sample at least one token")
    if (referee is None) != (top_k is None):
        raise ConfigError(
            "referee_top_k", top_k, "goes with a referee (the mixed sampler)", "give both or neither"
        )
    if top_k is not None and top_k < 1:
        raise ConfigError("referee_top_k", top_k, "must be >= 1", "choose K such as 25")


def _check_prompts(input_ids: Tensor, attention_mask: Tensor) -> None:
    """Prompts must be non-empty and left-padded: each mask row is 0...0 1...1 (one sync)."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or attention_mask.shape != input_ids.shape:
        raise ConfigError(
            "input_ids",
            tuple(input_ids.shape),
            "must be (B, P) with P >= 1 and a mask of the same shape",
            "pass a 2-D batch of prompts",
        )
    left_padded = bool((attention_mask[:, -1] != 0).all()) and bool((attention_mask.diff(dim=1) >= 0).all())
    if not left_padded:
        raise ConfigError(
            "attention_mask", "a row", "is not left-padded (or is empty)", "pad prompts on the left"
        )


def _check_referee(logits: Tensor, referee_logits: Tensor, top_k: int | None) -> None:
    vocab = logits.shape[-1]
    if referee_logits.shape[-1] != vocab:
        raise ConfigError(
            "referee",
            f"vocabulary of {referee_logits.shape[-1]}",
            f"differs from the model's {vocab}",
            "use a teacher and a student with one tokenizer",
        )
    if top_k is None or not 1 <= top_k <= vocab:
        raise ConfigError(
            "referee_top_k", top_k, f"must lie in [1, {vocab}]", "choose K within the vocabulary"
        )


def _check_generator(generator: torch.Generator | None, device: torch.device, greedy: bool) -> None:
    if generator is not None and not greedy and generator.device.type != device.type:
        raise ConfigError(
            "generator",
            str(generator.device),
            f"is not on the prompts' device ({device})",
            "build it with torch.Generator(device=...)",
        )


def _budget(models: Sequence[nn.Module], prompt_length: int, max_new_tokens: int) -> int:
    """``min(max_new_tokens, context - P)``, the one rule for every caller; a full context is an error."""
    contexts = [c for c in (context_length(m) for m in models) if c is not None]
    if not contexts:
        return max_new_tokens
    context = min(contexts)
    if prompt_length >= context:
        raise ConfigError(
            "input_ids",
            f"{prompt_length} prompt tokens",
            f"fill the model's context of {context} tokens",
            "shorten the prompts",
        )
    return min(max_new_tokens, context - prompt_length)


def _fork(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator seeded from a hash of ``generator``'s state (the device's global one when None).

    Reading the state consumes nothing, so the forked draws leave the main stream as it was.
    """
    source = generator if generator is not None else _default_generator(device)
    if source is None:  # a device without a readable global generator: seed from the global CPU RNG
        seed = int(torch.randint(0, 2**62, (1,)).item())
    else:
        digest = hashlib.blake2b(source.get_state().numpy().tobytes(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little") >> 2
    fork = torch.Generator(device=device)
    fork.manual_seed(seed)
    return fork


def _default_generator(device: torch.device) -> torch.Generator | None:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put the models in eval mode (no dropout); restore every submodule's own mode afterwards."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
