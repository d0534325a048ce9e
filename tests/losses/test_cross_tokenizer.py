"""ULD and GOLD, the losses between two vocabularies, against plain float64 references (value and gradient),
with masking and temperature, and through the chunked head loss."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from distilkit.data.vocabulary import VocabularyMap
from distilkit.errors import ConfigError
from distilkit.losses import ForwardKLLoss, GOLDLoss, ULDLoss
from distilkit.losses import sorted_l1 as sorted_l1_module
from distilkit.losses.chunked import HeadLossPlan, head_losses
from distilkit.losses.gold_rows import GOLDRows, gold_rows
from distilkit.losses.sorted_l1 import sorted_l1, sorted_l1_fast
from distilkit.models.heads import OutputHead
from distilkit.teachers.live import HeadTargets


# ----------------------------------------------------------------------------------------- references
def uld_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ|sort↓(p) − sort↓(q)| with the shorter vector padded with zeros, from the definition (float64)."""
    p, q = t.softmax(-1), s.softmax(-1)
    size = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, size - p.shape[-1])).sort(-1, descending=True).values
    q = torch.nn.functional.pad(q, (0, size - q.shape[-1])).sort(-1, descending=True).values
    return (p - q).abs().sum(-1)


def gold_reference(
    s, t, pairs: list[tuple[int, int]], exact_weight: float, uld_weight: float
) -> torch.Tensor:
    """exact_weight·P_S·KL(p̃‖q̃) + uld_weight·Σ|sort↓(p_rest) − sort↓(q_rest)|, float64."""
    p, q = t.softmax(-1), s.softmax(-1)
    student_ids = [a for a, _ in pairs]
    teacher_ids = [b for _, b in pairs]
    shared_p, shared_q = p[:, teacher_ids], q[:, student_ids]
    mass = shared_p.sum(-1)
    p_tilde, q_tilde = shared_p / mass[:, None], shared_q / shared_q.sum(-1, keepdim=True)
    exact = mass * (p_tilde * (p_tilde.log() - q_tilde.log())).sum(-1)
    p_rest = p[:, [i for i in range(p.shape[-1]) if i not in teacher_ids]]
    q_rest = q[:, [i for i in range(q.shape[-1]) if i not in student_ids]]
    size = max(p_rest.shape[-1], q_rest.shape[-1])
    p_rest = torch.nn.functional.pad(p_rest, (0, size - p_rest.shape[-1])).sort(-1, descending=True).values
    q_rest = torch.nn.functional.pad(q_rest, (0, size - q_rest.shape[-1])).sort(-1, descending=True).values
    return exact_weight * exact + uld_weight * (p_rest - q_rest).abs().sum(-1)


def loss_reference(per_position, s, t, labels, temperature: float) -> torch.Tensor:
    """T² · mean over unmasked positions of the per-position divergence of s/T, t/T."""
    keep = labels != -100
    return per_position(s[keep] / temperature, t[keep] / temperature).mean() * temperature**2


def random_pairs(student_size: int, teacher_size: int, shared: int, seed: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randperm(student_size, generator=generator)[:shared].tolist()
    teacher = torch.randperm(teacher_size, generator=generator)[:shared].tolist()
    return list(zip(student, teacher, strict=True))


def mapping_of(pairs, student_size: int, teacher_size: int) -> VocabularyMap:
    student = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    teacher = torch.tensor([b for _, b in pairs], dtype=torch.long)
    return VocabularyMap(student, teacher, student_size, teacher_size)


def value_and_grad(loss, s, t, labels):
    s = s.clone().requires_grad_(True)
    value = loss(s, t, labels)
    value.backward()
    return value.detach(), s.grad


def inputs(student_size: int, teacher_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 4, student_size, generator=generator) * 2
    t = torch.randn(3, 4, teacher_size, generator=generator) * 2
    labels = torch.randint(0, 5, (3, 4), generator=generator)
    labels[0, 1] = labels[2, 3] = -100
    return s, t, labels


# ----------------------------------------------------------------------------------------------- ULD
@pytest.mark.parametrize("student_size, teacher_size", [(11, 17), (17, 11), (13, 13)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_reference(student_size: int, teacher_size: int, temperature: float) -> None:
    s, t, labels = inputs(student_size, teacher_size)
    value, grad = value_and_grad(ULDLoss(temperature=temperature), s, t, labels)
    s64 = s.double().requires_grad_(True)
    want = loss_reference(uld_reference, s64, t.double(), labels, temperature)
    want.backward()
    torch.testing.assert_close(value, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s64.grad.float(), rtol=1e-4, atol=1e-6)
    assert grad[0, 1].abs().sum() == 0 and grad[2, 3].abs().sum() == 0  # masked positions


def test_uld_ignores_which_token_is_which() -> None:
    """ULD compares only the sorted probabilities: a permuted teacher, even over a larger vocabulary whose
    extra tokens have no mass, is at distance 0."""
    s = torch.randn(5, 9)
    t = torch.cat([s[:, torch.randperm(9)], torch.full((5, 4), -float("inf"))], dim=-1)  # (5, 13)
    assert ULDLoss()(s, t).abs() < 1e-6
    assert ULDLoss()(s, torch.randn(5, 13)) > 0.01


@pytest.mark.parametrize(
    "numpy_sort, rows_per_thread",
    [(True, 64), (True, 1), (False, 64)],
    ids=["numpy-sort", "numpy-sort-in-threads", "torch-sort"],
)
def test_sorted_l1_fast_matches_the_plain_formula(
    numpy_sort: bool, rows_per_thread: int, monkeypatch
) -> None:
    """Every sort the fast path uses: numpy's on the CPU (rows split over threads where there are enough),
    ``torch.sort`` on other devices."""
    monkeypatch.setattr(sorted_l1_module, "NUMPY_SORT_DEVICES", ("cpu",) if numpy_sort else ())
    monkeypatch.setattr(sorted_l1_module, "ROWS_PER_THREAD", rows_per_thread)
    monkeypatch.setattr(sorted_l1_module.torch, "get_num_threads", lambda: 4)
    generator = torch.Generator().manual_seed(1)
    for q_size, p_size in [(50, 70), (70, 50), (64, 64)]:
        q = torch.randn(6, q_size, generator=generator).softmax(-1).requires_grad_(True)
        p = torch.randn(6, p_size, generator=generator).softmax(-1)
        fast = sorted_l1_fast(p, q)
        (grad_fast,) = torch.autograd.grad(fast.sum(), q)
        plain = sorted_l1(p, q)
        (grad_plain,) = torch.autograd.grad(plain.sum(), q)
        torch.testing.assert_close(fast, plain)
        torch.testing.assert_close(grad_fast, grad_plain)


def _sort_rows_in_threads() -> None:
    values = np.random.default_rng(0).random((256, 40))
    sorted_l1_module._by_rows(lambda part: values[part].sort(axis=-1), len(values))
    assert (np.diff(values, axis=-1) >= 0).all()


def test_sorted_rows_in_threads_work_in_a_forked_child(monkeypatch) -> None:
    """The sorts' thread pool does not survive a fork: a child (a DataLoader worker, a forked rank) that
    sorts after its parent did makes its own, and does not wait forever on the parent's (numpy only: torch's
    own threads are not fork-safe either)."""
    monkeypatch.setattr(sorted_l1_module, "ROWS_PER_THREAD", 1)
    monkeypatch.setattr(sorted_l1_module.torch, "get_num_threads", lambda: 2)
    _sort_rows_in_threads()  # the parent's pool, with its threads
    child = multiprocessing.get_context("fork").Process(target=_sort_rows_in_threads)
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0


def test_uld_of_a_uniform_student_is_finite() -> None:
    """All-equal logits (a head initialised to zero) tie every probability: value and gradient stay finite."""
    s = torch.zeros(4, 16, requires_grad=True)
    value = ULDLoss(temperature=2.0)(s, torch.randn(4, 20))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------------- GOLD
@pytest.mark.parametrize("student_size, teacher_size, shared", [(11, 17, 6), (17, 11, 6), (13, 13, 12)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gold_matches_reference(
    student_size: int, teacher_size: int, shared: int, temperature: float
) -> None:
    s, t, labels = inputs(student_size, teacher_size, seed=2)
    pairs = random_pairs(student_size, teacher_size, shared, seed=3)
    loss = GOLDLoss(exact_weight=0.7, uld_weight=1.5, temperature=temperature)
    value, grad = value_and_grad(loss.bind(mapping_of(pairs, student_size, teacher_size)), s, t, labels)
    s64 = s.double().requires_grad_(True)

    def reference(a, b):
        return gold_reference(a, b, pairs, 0.7, 1.5)

    want = loss_reference(reference, s64, t.double(), labels, temperature)
    want.backward()
    torch.testing.assert_close(value, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s64.grad.float(), rtol=1e-4, atol=1e-6)


def test_gold_on_one_vocabulary_is_the_forward_kl() -> None:
    """Every token shared: no rest, and P_S·KL(p̃‖q̃) = KL(p‖q)."""
    s, t, labels = inputs(13, 13, seed=4)
    gold = GOLDLoss(temperature=2.0).bind(mapping_of([(i, i) for i in range(13)], 13, 13))
    got, got_grad = value_and_grad(gold, s, t, labels)
    want, want_grad = value_and_grad(ForwardKLLoss(temperature=2.0), s, t, labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_gold_with_nothing_shared_is_uld() -> None:
    s, t, labels = inputs(11, 17, seed=5)
    gold = GOLDLoss(uld_weight=1.0).bind(mapping_of([], 11, 17))
    torch.testing.assert_close(gold(s, t, labels), ULDLoss()(s, t, labels))


def test_gold_takes_logits_wider_than_its_mapping() -> None:
    """A model's head may have more rows than its tokenizer has tokens: the extra ones are unshared."""
    s, t, labels = inputs(16, 20, seed=6)
    pairs = random_pairs(12, 17, 5, seed=7)
    gold = GOLDLoss().bind(mapping_of(pairs, 12, 17))
    want = loss_reference(
        lambda a, b: gold_reference(a, b, pairs, 1.0, 1.0), s.double(), t.double(), labels, 1.0
    )
    torch.testing.assert_close(gold(s, t, labels), want.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fewer than the 17 tokens"):
        gold(s, t[..., :16], labels)


def test_gold_refuses_to_run_unbound() -> None:
    with pytest.raises(ConfigError, match=r"loss='GOLDLoss': has no vocabulary mapping.*shared_vocabulary"):
        GOLDLoss()(torch.randn(2, 5), torch.randn(2, 7))


def test_gold_knobs_are_validated() -> None:
    gold = GOLDLoss()
    assert set(gold.knobs) == {"temperature", "exact_weight", "uld_weight"}
    gold.set_knob("exact_weight", 0.25)
    gold.set_knob("uld_weight", 3.0)
    assert (gold.exact_weight, gold.uld_weight) == (0.25, 3.0)
    with pytest.raises(ConfigError, match="loss.uld_weight"):
        gold.set_knob("uld_weight", -1.0)
    with pytest.raises(ConfigError, match="loss.exact_weight"):
        GOLDLoss(exact_weight="a")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- both
@pytest.mark.parametrize(
    "make", [ULDLoss, lambda: GOLDLoss().bind(mapping_of(random_pairs(7, 9, 3, 0), 7, 9))]
)
def test_contract_of_a_cross_vocabulary_loss(make) -> None:
    """float32 from bf16, exactly 0 with a gradient path when all is masked, leading dimensions checked,
    teacher caches refused."""
    loss = make()
    s, t = torch.randn(2, 3, 7, dtype=torch.bfloat16), torch.randn(2, 3, 9, dtype=torch.bfloat16)
    assert loss(s, t).dtype == torch.float32
    s32 = s.float().requires_grad_(True)
    masked = loss(s32, t, torch.full((2, 3), -100))
    masked.backward()
    assert masked.item() == 0.0 and s32.grad is not None
    with pytest.raises(ValueError, match="same leading dimensions"):
        loss(s, t[:, :2])
    with pytest.raises(ConfigError, match="teacher cache"):
        loss.check_sparse("topk")


def test_same_vocabulary_losses_still_refuse_two_vocabularies() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ForwardKLLoss()(torch.randn(2, 7), torch.randn(2, 9))


@pytest.mark.parametrize(
    "make", [ULDLoss, lambda: GOLDLoss().bind(mapping_of(random_pairs(13, 17, 6, 0), 13, 17))]
)
def test_chunked_head_loss_with_a_teacher_of_another_vocabulary(make) -> None:
    """Through the chunk loop, (n, V_s) student logits against (n, V_t) teacher logits a chunk at a time,
    equal to the unchunked reference path (value and gradients)."""
    generator = torch.Generator().manual_seed(8)
    features, student_weight = (
        torch.randn(10, 6, generator=generator),
        torch.randn(13, 6, generator=generator),
    )
    teacher_features, teacher_head = (
        torch.randn(10, 5, generator=generator),
        OutputHead(torch.randn(17, 5), None, 17),
    )

    teacher = HeadTargets(teacher_features, teacher_head)  # (n, 17) a chunk: not the student's (n, 13) buffer

    loss = make()

    def run(chunk_size):
        weight = student_weight.clone().requires_grad_(True)
        plan = HeadLossPlan(
            student_head=OutputHead(weight, None, 13), teacher=teacher, labels=torch.zeros(10).long(),
            terms=lambda student, chunk, labels: {"kd_loss": loss(student, chunk)}, names=("kd_loss",),
            weights={"kd_loss": 1.0}, chunk_size=chunk_size,
        )  # fmt: skip
        x = features.clone().requires_grad_(True)
        total = head_losses(x, plan)["loss"]
        total.backward()
        return total, x.grad, weight.grad

    for got, want in zip(run(3), run(None), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gold_closed_form_matches_autograd_through_the_plain_formula() -> None:
    """:class:`GOLDRows` (gradient formed in the forward pass) against :func:`gold_rows` (autograd), the form
    ``torch.compile`` gets; a teacher with masked (-inf) entries included."""
    s, t, _ = inputs(30, 40, seed=9)
    s, t = s.reshape(-1, 30), t.reshape(-1, 40)
    t[:, :5] = -float("inf")
    gold = GOLDLoss(exact_weight=0.5, uld_weight=2.0).bind(
        mapping_of(random_pairs(30, 40, 20, seed=10), 30, 40)
    )
    columns = gold.columns(30, 40, s.device)
    fast_input, plain_input = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fast = GOLDRows.apply(fast_input, t, columns, (0.5, 2.0))
    plain = gold_rows(plain_input, t, columns, (0.5, 2.0))
    (fast * torch.arange(len(fast))).sum().backward()  # a different weight for every row
    (plain * torch.arange(len(plain))).sum().backward()
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(fast_input.grad, plain_input.grad)


def _edge(case: str):
    """Logits ``(12, 9)``, ``(12, 11)`` and pairs for one edge case of :class:`GOLDRows`."""
    s, t, _ = inputs(9, 11, seed=12)
    s, t = s.reshape(-1, 9), t.reshape(-1, 11)
    pairs = [(i, i + 1) for i in range(6)]
    if case == "nothing shared":
        pairs = []
    elif case == "every student token shared":
        pairs = [(i, i + 2) for i in range(9)]
    elif case == "no teacher mass on the shared tokens":
        t[0, 1:7] = -float("inf")
    elif case == "a student -inf on an unshared token":
        s[:, 8] = -float("inf")
    elif case == "no teacher mass and the student's shared mass underflowing":
        t[0, 1:7] = -float("inf")
        s[0, 8] = 200.0
    return s, t, pairs


@pytest.mark.parametrize(
    "case",
    [
        "nothing shared",
        "every student token shared",
        "no teacher mass on the shared tokens",
        "a student -inf on an unshared token",
        "no teacher mass and the student's shared mass underflowing",
    ],
)
def test_gold_closed_form_matches_the_plain_formula_at_the_edges(case: str) -> None:
    s, t, pairs = _edge(case)
    gold = GOLDLoss(exact_weight=0.5, uld_weight=2.0).bind(mapping_of(pairs, 9, 11))
    columns = gold.columns(9, 11, s.device)
    fast_input, plain_input = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fast = GOLDRows.apply(fast_input, t, columns, (0.5, 2.0))
    plain = gold_rows(plain_input, t, columns, (0.5, 2.0))
    (fast * torch.arange(len(fast))).sum().backward()
    (plain * torch.arange(len(plain))).sum().backward()
    assert torch.isfinite(fast).all() and torch.isfinite(fast_input.grad).all()
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(fast_input.grad, plain_input.grad)


def test_gold_leaves_its_inputs_alone() -> None:
    """The logits handed in are not written to; no gradient asked: the same value, redone rows too."""
    s, t, pairs = _edge("no teacher mass and the student's shared mass underflowing")
    gold = GOLDLoss().bind(mapping_of(pairs, 9, 11))
    student, t_before = s.clone().requires_grad_(True), t.clone()
    value = gold(student, t)
    value.backward()
    torch.testing.assert_close(student.detach(), s, equal_nan=True)
    torch.testing.assert_close(t, t_before, equal_nan=True)
    with torch.no_grad():
        torch.testing.assert_close(gold(s, t), value.detach())


def test_gold_stays_finite_where_probabilities_underflow() -> None:
    """Logit gaps beyond float32's exp range (a peaked student at T = 1): q underflows to 0 on shared tokens
    the teacher still gives mass to; log q̃ comes from the logits, so KL, value and gradient stay finite."""
    s = torch.zeros(2, 6)
    s[:, 0] = 200.0  # q = (1, 0, 0, 0, 0, 0) in float32
    t = torch.zeros(2, 6)
    gold = GOLDLoss().bind(mapping_of([(i, i) for i in range(4)], 6, 6))
    s.requires_grad_(True)
    value = gold(s, t)
    value.backward()
    assert torch.isfinite(value) and value > 90 and torch.isfinite(s.grad).all()  # ≈ (2/3)·0.75·200


def test_gold_rows_whose_shared_mass_underflows_are_taken_from_the_logits() -> None:
    """A student sure of an unshared token (Q_S = e^-200, zero in float32): the exact term still compares
    q̃ (uniform over the shared tokens) with p̃; value and gradient as the float64 reference, rows mixed."""
    s, t, _ = inputs(9, 7, seed=11)
    s, t = s.reshape(-1, 9), t.reshape(-1, 7)
    s[::3] = 0.0
    s[::3, 8] = 200.0  # student id 8 is not shared
    pairs = [(i, i) for i in range(5)]
    gold = GOLDLoss(exact_weight=0.5, uld_weight=2.0).bind(mapping_of(pairs, 9, 7))
    value, grad = value_and_grad(gold, s, t, None)
    s64 = s.double().requires_grad_(True)
    want = gold_reference(s64, t.double(), pairs, 0.5, 2.0).mean()
    want.backward()
    torch.testing.assert_close(value, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s64.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["uld", "gold"])
def test_a_module_trains_with_a_cross_vocabulary_loss(name, datamodule, tmp_path) -> None:
    """With the teacher's own tokenizer (the module as it is): ULD as it comes, GOLD bound to the vocabulary
    shared with itself; a few steps, finite losses, the student moves."""
    from helpers import tiny_module, tiny_trainer

    from distilkit.data.vocabulary import shared_vocabulary

    tokenizer = datamodule.tokenizer
    loss = (
        ULDLoss(temperature=2.0)
        if name == "uld"
        else GOLDLoss().bind(shared_vocabulary(tokenizer, tokenizer))
    )
    module = tiny_module(datamodule, loss=loss, kd_ratio=1.0)
    before = [p.detach().clone() for p in module.student.parameters()]
    trainer = tiny_trainer(tmp_path, max_steps=3, val_check_interval=3)
    trainer.fit(module, datamodule)
    assert torch.isfinite(trainer.callback_metrics["val/kd_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters(), strict=True))


def test_recipes_choose_them_by_class_path(tmp_path, corpus, cache_dir, capsys) -> None:
    """``loss: {class_path: distilkit.losses.GOLDLoss, init_args: {...}}`` parses, knobs included."""
    import yaml
    from helpers import run_cli, tiny_recipe

    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, {"vocab_size": 400}, cache_dir)
    gold = (
        '{"class_path": "distilkit.losses.GOLDLoss", "init_args": {"exact_weight": 0.5, "uld_weight": 2.0}}'
    )
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(recipe), "--model.init_args.loss", gold, "--print_config")
    loss = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["loss"]
    assert loss["class_path"] == "distilkit.losses.GOLDLoss"
    assert (loss["init_args"]["exact_weight"], loss["init_args"]["uld_weight"]) == (0.5, 2.0)
