"""The one sampling loop (``distilkit.generation``): exactness against HF ``generate``, randomness,
temperature / nucleus distributions, EOS and context limits, train/eval mode, the mixed sampler, text."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from distilkit.errors import ConfigError
from distilkit.models.generation import (
    STOP_CHECK_EVERY,
    Sampled,
    generate_text,
    left_pad,
    sample_tokens,
    sample_with,
)

V, EOS, PAD, CONTEXT = 100, 1, 0, 64
DRAWS = 20_000  # rows of one prompt sampled at once for the distribution tests
CPU = torch.device("cpu")


def tiny_gpt2(seed: int = 0, vocab: int = V, context: int = CONTEXT, **overrides: object) -> GPT2LMHeadModel:
    """GPT-2 2x32 with init 0.3 (peaked logits: distributions far from uniform, no near-ties)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=context, initializer_range=0.3,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, **overrides,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama 2x32 (rotary positions, grouped-query attention), same vocabulary as ``tiny_gpt2``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, initializer_range=0.3,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


MODELS: dict[str, Callable[..., nn.Module]] = {"gpt2": tiny_gpt2, "llama": tiny_llama}
ROWS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]  # prompts of different lengths


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompts(batch: int, length: int, seed: int = 1) -> Tensor:
    return torch.randint(2, V, (batch, length), generator=seeded(seed))  # (B, P), no EOS inside


def next_token_logits(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(B, T, V)`` full-prefix logits (no cache), positions counted from each row's first real token."""
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()


def chi_square_p(counts: Tensor, probs: Tensor) -> float:
    """Pearson's goodness-of-fit p-value; bins expected below 5 draws are pooled into one bin.

    Under the null the statistic follows chi-square(k - 1) closely once every expected count is >= 5;
    the survival function is the regularised upper incomplete gamma Q(df / 2, stat / 2).
    """
    n = counts.sum().double()
    expected = probs.double() * n
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


# Tolerance of the distribution tests: a correct sampler gives p < 1e-3 for one seed in a thousand (the
# seed is fixed, so the test is deterministic); each test also shows the same draws reject a 30% wrong
# temperature (or the wrong mixture) with p < 1e-6, so the check has power at DRAWS = 20,000.
ALPHA, POWER_ALPHA = 1e-3, 1e-6


# --------------------------------------------------------------------------------- 1. greedy == generate


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_equals_hf_generate_on_equal_length_prompts(arch: str) -> None:
    model = MODELS[arch]()
    ids = prompts(4, 6)
    ours = sample_tokens(model, ids, max_new_tokens=20, greedy=True, eos_token_id=EOS, pad_token_id=PAD)
    theirs = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
        eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    assert torch.equal(ours.tokens, theirs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_prompts_sample_what_they_sample_alone(arch: str) -> None:
    model = MODELS[arch]()
    ids, mask = left_pad(ROWS, PAD, CPU)
    batch = sample_tokens(model, ids, mask, max_new_tokens=16, greedy=True)
    theirs = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=PAD
    )
    assert torch.equal(batch.tokens, theirs)
    for i, row in enumerate(ROWS):
        alone = sample_tokens(model, torch.tensor([row]), max_new_tokens=16, greedy=True)
        assert torch.equal(batch.new_tokens[i], alone.new_tokens[0])
    assert torch.equal(batch.attention_mask[:, : ids.shape[1]], mask)
    assert batch.attention_mask[:, ids.shape[1] :].all()


def test_left_padded_sampling_matches_alone_under_the_same_draws() -> None:
    """Sampling ignores the padding too. Each step draws noise for the whole batch, so compare rows that
    see the same noise: a short prompt padded beside longer ones, and the same prompt in an unpadded batch."""
    model = tiny_gpt2()
    row = ROWS[0]
    ids, mask = left_pad([row, ROWS[1]] * 2, PAD, CPU)  # rows 0 and 2: the short prompt, padded
    plain = torch.tensor([row] * 4)
    padded = sample_tokens(model, ids, mask, max_new_tokens=12, generator=seeded(3))
    unpadded = sample_tokens(model, plain, max_new_tokens=12, generator=seeded(3))
    assert torch.equal(padded.new_tokens[[0, 2]], unpadded.new_tokens[[0, 2]])


# ----------------------------------------------------------------------------------- 2. random streams


@pytest.mark.parametrize("mixed", [False, True])
def test_seeded_generator_is_reproducible_and_leaves_the_global_rng_alone(mixed: bool) -> None:
    model, referee = tiny_gpt2(0), tiny_llama(1)
    extra = {"referee": referee, "referee_top_k": 10} if mixed else {}
    ids = prompts(4, 5)
    state = torch.get_rng_state()
    a = sample_tokens(model, ids, max_new_tokens=16, generator=seeded(7), **extra)
    b = sample_tokens(model, ids, max_new_tokens=16, generator=seeded(7), **extra)
    c = sample_tokens(model, ids, max_new_tokens=16, generator=seeded(8), **extra)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_without_a_generator_sampling_follows_the_global_rng() -> None:
    model, ids = tiny_gpt2(), prompts(4, 5)
    torch.manual_seed(11)
    a = sample_tokens(model, ids, max_new_tokens=16)
    after = torch.get_rng_state()
    torch.manual_seed(11)
    b = sample_tokens(model, ids, max_new_tokens=16)
    torch.manual_seed(12)
    c = sample_tokens(model, ids, max_new_tokens=16)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    torch.manual_seed(11)
    assert not torch.equal(torch.get_rng_state(), after)  # the draws advanced the global stream


# -------------------------------------------------------------------------------- 3. temperature, top-p


def test_tiny_top_p_samples_the_argmax() -> None:
    model, ids = tiny_gpt2(), prompts(6, 5)
    nucleus = sample_tokens(model, ids, max_new_tokens=16, top_p=1e-6, generator=seeded(0))
    greedy = sample_tokens(model, ids, max_new_tokens=16, greedy=True)
    assert torch.equal(nucleus.tokens, greedy.tokens)


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_first_token_follows_softmax_of_logits_over_temperature(temperature: float) -> None:
    model, prompt = tiny_gpt2(), prompts(1, 4)
    logits = next_token_logits(model, prompt)[0, -1]  # (V,)
    sampled = sample_tokens(
        model, prompt.expand(DRAWS, -1), max_new_tokens=1, temperature=temperature, generator=seeded(5)
    )
    counts = torch.bincount(sampled.new_tokens[:, 0], minlength=V)
    assert chi_square_p(counts, torch.softmax(logits / temperature, -1)) > ALPHA
    assert chi_square_p(counts, torch.softmax(logits / (1.3 * temperature), -1)) < POWER_ALPHA


def test_first_token_follows_the_renormalised_nucleus() -> None:
    model, prompt, top_p = tiny_gpt2(), prompts(1, 4), 0.6
    probs = torch.softmax(next_token_logits(model, prompt)[0, -1], -1)  # (V,)
    ordered, order = probs.sort(descending=True)
    inside = torch.zeros(V, dtype=torch.bool)
    inside[order[(ordered.cumsum(0) - ordered) < top_p]] = True  # smallest top set with mass >= top_p
    assert 1 < int(inside.sum()) < V  # the check means something
    sampled = sample_tokens(
        model, prompt.expand(DRAWS, -1), max_new_tokens=1, top_p=top_p, generator=seeded(6)
    )
    counts = torch.bincount(sampled.new_tokens[:, 0], minlength=V)
    assert counts[~inside].sum() == 0
    nucleus = torch.where(inside, probs, 0.0) / probs[inside].sum()
    assert chi_square_p(counts[inside], nucleus[inside]) > ALPHA
    hotter = torch.softmax(next_token_logits(model, prompt)[0, -1] / 1.3, -1)[inside]
    assert chi_square_p(counts[inside], hotter / hotter.sum()) < POWER_ALPHA


# ------------------------------------------------------------------------------------ 4. EOS, context


def test_rows_end_at_eos_then_pad_and_mask() -> None:
    model, ids = tiny_gpt2(), prompts(8, 4)
    free = sample_tokens(model, ids, max_new_tokens=24, generator=seeded(2))
    eos = int(torch.mode(free.new_tokens.flatten()).values)  # a frequent token: several rows contain it
    ended = sample_tokens(
        model, ids, max_new_tokens=24, generator=seeded(2), eos_token_id=eos, pad_token_id=PAD
    )
    p = ids.shape[1]
    rows_with_eos = 0
    for row in range(ids.shape[0]):
        hits = (free.new_tokens[row] == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else 24  # sampled tokens up to and including EOS
        rows_with_eos += bool(len(hits))
        new, gen = ended.new_tokens[row], ended.generated_mask[row, p:]
        assert torch.equal(new[:length], free.new_tokens[row, :length])
        assert (new[length:] == PAD).all()
        assert gen[:length].all() and not gen[length:].any()
        assert torch.equal(ended.attention_mask[row, p:].bool(), gen)
    assert rows_with_eos >= 2
    assert not ended.generated_mask[:, :p].any()
    assert torch.equal(ended.labels()[ended.generated_mask], ended.tokens[ended.generated_mask])
    assert (ended.labels()[~ended.generated_mask] == -100).all()


def test_the_loop_stops_once_every_row_has_ended() -> None:
    model = tiny_gpt2()
    ids = prompts(1, 4).expand(3, -1)  # identical rows end together
    greedy = sample_tokens(model, ids, max_new_tokens=40, greedy=True)
    eos = int(greedy.new_tokens[0, 2])
    length = int((greedy.new_tokens[0] == eos).nonzero()[0]) + 1
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    ended = sample_tokens(model, ids, max_new_tokens=40, greedy=True, eos_token_id=eos)
    hook.remove()
    assert ended.tokens.shape[1] == ids.shape[1] + length
    assert ended.generated_mask.sum(1).tolist() == [length] * 3
    assert len(calls) <= length + STOP_CHECK_EVERY < 40  # stopped early, not just trimmed


def test_new_tokens_are_capped_by_the_context() -> None:
    model = tiny_gpt2()
    assert sample_tokens(model, prompts(2, 60), max_new_tokens=10, greedy=True).tokens.shape == (2, CONTEXT)
    assert sample_tokens(model, prompts(2, 63), max_new_tokens=10, greedy=True).new_tokens.shape == (2, 1)
    short_referee = tiny_gpt2(1, context=62)
    mixed = sample_tokens(
        model, prompts(2, 60), max_new_tokens=10, referee=short_referee, referee_top_k=5, generator=seeded(0)
    )
    assert mixed.new_tokens.shape == (2, 2)  # the smaller context of the two
    with pytest.raises(ConfigError, match="context of 64"):
        sample_tokens(model, prompts(2, 64), max_new_tokens=10, greedy=True)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_settings_are_config_errors(options: dict, field: str) -> None:
    settings = {"max_new_tokens": 4, **options}
    with pytest.raises(ConfigError, match=field):
        sample_tokens(tiny_gpt2(), prompts(2, 3), **settings)


def test_right_padded_or_empty_prompts_are_config_errors() -> None:
    model, ids = tiny_gpt2(), prompts(2, 4)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ConfigError, match="left-padded"):
        sample_tokens(model, ids, right, max_new_tokens=2)
    with pytest.raises(ConfigError, match="left-padded"):
        sample_tokens(model, ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), max_new_tokens=2)
    elsewhere = SimpleNamespace(device=torch.device("cuda"))  # a generator on another device (stand-in)
    with pytest.raises(ConfigError, match="generator"):
        sample_tokens(model, ids, max_new_tokens=2, generator=elsewhere)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- 5. eval mode


def test_a_training_model_samples_in_eval_mode_and_gets_its_modes_back() -> None:
    model = tiny_gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5).train()
    model.transformer.h[0].eval()  # a submodule in its own mode keeps it
    ids = prompts(3, 5)
    first = sample_tokens(model, ids, max_new_tokens=12, greedy=True)
    second = sample_tokens(model, ids, max_new_tokens=12, greedy=True)
    assert torch.equal(first.tokens, second.tokens)
    assert model.training and model.transformer.drop.training and not model.transformer.h[0].training
    assert not model.transformer.h[0].attn.training
    model.eval()
    assert torch.equal(sample_tokens(model, ids, max_new_tokens=12, greedy=True).tokens, first.tokens)
    with torch.enable_grad():
        assert not sample_tokens(model, ids, max_new_tokens=2, greedy=True).tokens.requires_grad


# ------------------------------------------------------------------------------------- 6. mixed sampler


def test_mixed_keeps_only_proposals_inside_the_teachers_top_k() -> None:
    student, teacher, top_k = tiny_llama(0), tiny_gpt2(1), 20
    ids, mask = left_pad([[*row, 30 + i] for i, row in enumerate(ROWS * 3)], PAD, CPU)
    out = sample_tokens(
        student, ids, mask, max_new_tokens=24, referee=teacher, referee_top_k=top_k, generator=seeded(4)
    )
    assert out.proposal_kept is not None
    kept, replaced = out.proposal_kept, out.generated_mask & ~out.proposal_kept
    assert not (kept & ~out.generated_mask).any()
    assert kept.sum() > 10 and replaced.sum() > 10  # both cases occur
    logits = next_token_logits(teacher, out.tokens, out.attention_mask)[:, :-1]  # (B, W - 1, V) predict 1:
    kth = logits.topk(top_k, dim=-1).values[..., -1]  # (B, W - 1)
    chosen = logits.gather(-1, out.tokens[:, 1:, None]).squeeze(-1)  # (B, W - 1)
    # incremental and full-prefix logits differ by ~1e-6 here; 1e-4 absorbs that and nothing else
    assert (chosen[kept[:, 1:]] >= kth[kept[:, 1:]] - 1e-4).all()


def test_mixed_first_token_follows_kept_proposals_plus_teacher_samples() -> None:
    """P(x) = q(x) [x in top-K(p)] + (sum of q outside top-K) p(x), q the student's and p the teacher's
    distributions at temperature T: replaced tokens are fresh teacher samples."""
    student, teacher, top_k, temperature = tiny_gpt2(0), tiny_gpt2(1), 10, 1.2
    prompt = prompts(1, 4)
    q = torch.softmax(next_token_logits(student, prompt)[0, -1] / temperature, -1)  # (V,)
    teacher_logits = next_token_logits(teacher, prompt)[0, -1]  # (V,)
    p = torch.softmax(teacher_logits / temperature, -1)
    inside = torch.zeros(V, dtype=torch.bool)
    inside[teacher_logits.topk(top_k).indices] = True
    expected = torch.where(inside, q, 0.0) + q[~inside].sum() * p
    out = sample_tokens(
        student, prompt.expand(DRAWS, -1), max_new_tokens=1, temperature=temperature, referee=teacher,
        referee_top_k=top_k, generator=seeded(9),
    )  # fmt: skip
    counts = torch.bincount(out.new_tokens[:, 0], minlength=V)
    assert chi_square_p(counts, expected) > ALPHA
    assert chi_square_p(counts, q) < POWER_ALPHA and chi_square_p(counts, p) < POWER_ALPHA
    assert out.proposal_kept is not None
    kept = out.proposal_kept[:, -1]
    assert inside[out.new_tokens[kept, 0]].all()
    assert abs(float(kept.float().mean()) - float(q[inside].sum())) < 0.02  # acceptance = q(top-K)


def test_mixed_with_k_equal_to_the_vocabulary_is_the_student_sampler() -> None:
    student, teacher = tiny_gpt2(0), tiny_llama(1)
    ids, mask = left_pad(ROWS, PAD, CPU)
    options = {"max_new_tokens": 20, "temperature": 1.3, "top_p": 0.9, "eos_token_id": EOS}
    alone = sample_tokens(student, ids, mask, generator=seeded(21), **options)
    mixed = sample_tokens(
        student, ids, mask, generator=seeded(21), referee=teacher, referee_top_k=V, **options
    )
    assert torch.equal(mixed.tokens, alone.tokens)
    assert mixed.proposal_kept is not None and torch.equal(mixed.proposal_kept, alone.generated_mask)


def test_mixed_greedy_with_k_one_is_the_teachers_greedy_output() -> None:
    student, teacher = tiny_llama(0), tiny_gpt2(1)
    ids, mask = left_pad(ROWS, PAD, CPU)
    mixed = sample_tokens(
        student, ids, mask, max_new_tokens=20, greedy=True, referee=teacher, referee_top_k=1
    )
    alone = sample_tokens(teacher, ids, mask, max_new_tokens=20, greedy=True)
    assert torch.equal(mixed.tokens, alone.tokens)
    assert mixed.proposal_kept is not None
    assert not mixed.proposal_kept.all()  # the student did disagree somewhere: the referee replaced it


def test_mixed_sampler_errors() -> None:
    student, teacher, ids = tiny_gpt2(0), tiny_gpt2(1), prompts(2, 3)
    with pytest.raises(ConfigError, match="referee_top_k"):
        sample_tokens(student, ids, max_new_tokens=2, referee=teacher)
    with pytest.raises(ConfigError, match="referee_top_k"):
        sample_tokens(student, ids, max_new_tokens=2, referee_top_k=3)
    with pytest.raises(ConfigError, match="referee_top_k"):
        sample_tokens(student, ids, max_new_tokens=2, referee=teacher, referee_top_k=V + 1)
    with pytest.raises(ConfigError, match="vocabulary"):
        sample_tokens(student, ids, max_new_tokens=2, referee=tiny_gpt2(1, vocab=V + 20), referee_top_k=3)


def test_sample_with_names_the_three_samplers() -> None:
    student, teacher, ids = tiny_gpt2(0), tiny_llama(1), prompts(3, 4)
    options = {"max_new_tokens": 10, "greedy": True}
    assert torch.equal(
        sample_with("teacher", student, teacher, ids, **options).tokens,
        sample_tokens(teacher, ids, **options).tokens,
    )
    assert torch.equal(
        sample_with("student", student, teacher, ids, **options).tokens,
        sample_tokens(student, ids, **options).tokens,
    )
    mixed = sample_with("mixed", student, teacher, ids, referee_top_k=1, **options)
    assert torch.equal(mixed.tokens, sample_tokens(teacher, ids, **options).tokens)
    with pytest.raises(ConfigError, match="sampler"):
        sample_with("beam", student, teacher, ids, **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a teacher"):
        sample_with("mixed", student, None, ids, **options)


# ----------------------------------------------------------------------------------------------- 7. text


@pytest.fixture(scope="module")
def text_model(tokenizer_dir) -> tuple[GPT2LMHeadModel, object]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_gpt2(3, vocab=len(tokenizer))
    model.config.eos_token_id = model.config.bos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def test_generate_text_greedy_matches_hf_generate_prompt_by_prompt(text_model) -> None:
    model, tokenizer = text_model
    texts = ["def f(x):", "", "The class of an object is"]
    side = tokenizer.padding_side
    completions = generate_text(model, tokenizer, texts, max_new_tokens=12, greedy=True)
    assert len(completions) == 3 and all(isinstance(c, str) for c in completions)
    for text, completion in zip(texts, completions, strict=True):
        ids = tokenizer(text or tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **ids, do_sample=False, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        reference = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert completion == reference
    assert tokenizer.padding_side == side  # the caller's tokenizer is left as it was


def test_generate_text_sampling_is_the_decoded_token_sample(text_model) -> None:
    model, tokenizer = text_model
    texts = ["import os", "", "A list is"]
    options = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95}
    first = generate_text(model, tokenizer, texts, generator=seeded(1), **options)
    again = generate_text(model, tokenizer, texts, generator=seeded(1), **options)
    assert first == again
    rows = [tokenizer(t or tokenizer.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = left_pad(rows, tokenizer.eos_token_id, CPU)
    tokens: Sampled = sample_tokens(
        model, ids, mask, eos_token_id=tokenizer.eos_token_id, generator=seeded(1), **options
    )
    assert first == tokenizer.batch_decode(tokens.new_tokens.tolist(), skip_special_tokens=True)
    assert any(first)  # something was written
    with pytest.raises(ConfigError, match="context"):
        generate_text(model, tokenizer, ["x " * 200], max_new_tokens=4, greedy=True)
