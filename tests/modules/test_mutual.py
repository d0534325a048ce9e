"""MutualDistillationModule: peers alone at kd_ratio 0, detached targets, what each update saw, frozen
peers, per-peer curriculum knobs and rates, export of each peer; resume after a kill and DDP (slow)."""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    TINY_STUDENT,
    csv_rows,
    fit_run,
    kill_when_checkpointed,
    run_cli,
    tiny_module,
    tiny_recipe,
    tiny_trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilkit import CurriculumCallback, ForwardKLLoss, MutualDistillationModule, Stage
from distilkit.batch import next_token_targets
from distilkit.commands.trainer import print_summary
from distilkit.errors import ConfigError
from distilkit.models.loading import load_causal_lm

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SMALL = {**TINY_STUDENT, **NO_DROPOUT}  # GPT-2 1 x 32
WIDER = {**SMALL, "n_embd": 48}  # GPT-2 1 x 48: peers may differ in size


def _model(datamodule, spec):
    defaults = {"vocab_size": datamodule.vocab_size, "max_position_embeddings": datamodule.block_size}
    return load_causal_lm(spec, field="test", defaults=defaults).train()


def _cohort(datamodule, peers, cls=MutualDistillationModule, **kwargs) -> MutualDistillationModule:
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=3e-3))
    return cls(
        peers,
        vocab_size=datamodule.vocab_size,
        block_size=datamodule.block_size,
        eos_token_id=datamodule.eos_token_id,
        **kwargs,
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_with_kd_ratio_zero_each_peer_trains_exactly_as_alone(datamodule, tmp_path):
    """Same weights as a DistillationModule without a teacher on the same batches (clipping included), in
    both update modes: to float rounding, as the module alone takes CE's gradient in closed form."""
    torch.manual_seed(0)
    peers = [_model(datamodule, SMALL), _model(datamodule, WIDER)]
    alone = []
    for peer in peers:
        module = tiny_module(
            datamodule,
            teacher=None,
            student=copy.deepcopy(peer),
            optimizer=partial(torch.optim.AdamW, lr=3e-3),
        )
        tiny_trainer(tmp_path, max_steps=3, gradient_clip_val=0.05, limit_val_batches=0).fit(
            module, datamodule
        )
        alone.append(_state(module.student))
    for update in ("alternate", "simultaneous"):
        cohort = _cohort(
            datamodule, [copy.deepcopy(p) for p in peers], kd_ratio=0.0, update=update, gradient_clip_val=0.05
        )
        tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(cohort, datamodule)
        assert cohort.trainer.global_step == 3, "one global step per batch, whatever the number of peers"
        for peer, expected in zip(cohort.peers, alone, strict=True):
            torch.testing.assert_close(_state(peer), expected, rtol=1e-5, atol=1e-5)


def test_the_targets_are_detached_no_gradient_crosses_between_peers(datamodule):
    torch.manual_seed(0)
    cohort = _cohort(datamodule, [SMALL, WIDER, SMALL], weights=[1.0, 2.0, 1.0])  # a mixture of two others
    batch = next(iter(datamodule.train_dataloader()))
    keep, labels = next_token_targets(batch["labels"])
    for chunk_size in (None, 16):  # the reference path and the chunked one
        cohort.chunk_size = chunk_size
        cohort.zero_grad(set_to_none=True)
        features = [cohort.peer_forward(i, batch).last[:, :-1][keep] for i in range(3)]
        cohort.peer_losses(1, features, labels)["loss"].backward()
        assert all(p.grad is None for i in (0, 2) for p in cohort.peers[i].parameters())
        assert all(p.grad is not None for p in cohort.peers[1].parameters() if p.requires_grad)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_peer_better_positions_learn_from_the_others_only_where_they_predict_the_next_token_better(
    datamodule, chunk_size
):
    """KD = (1/N)·Σ_t g_t·KL(m_t ‖ p_t), g_t = [m_t(y_t) > p_t(y_t)]; at the other positions the peer's
    gradient is CE's alone; with two peers, no position teaches both ways."""
    torch.manual_seed(0)
    cohort = _cohort(datamodule, [SMALL, WIDER], kd_positions="peer_better", chunk_size=chunk_size)
    batch = next(iter(datamodule.train_dataloader()))
    keep, labels = next_token_targets(batch["labels"])
    features = [cohort.peer_forward(i, batch).last[:, :-1][keep] for i in range(2)]
    logits = [cohort.peer_head(i)(f).float() for i, f in enumerate(features)]  # (N, V)
    nll = [torch.nn.functional.cross_entropy(z, labels, reduction="none") for z in logits]  # (N,)
    learns = [nll[1] < nll[0], nll[0] < nll[1]]  # where the other peer predicts better
    assert 0 < learns[0].sum() < labels.numel() and not (learns[0] & learns[1]).any()
    for index, other in ((0, 1), (1, 0)):
        cohort.zero_grad(set_to_none=True)
        losses = cohort.peer_losses(index, features, labels)
        kl = torch.nn.functional.kl_div(
            logits[index].log_softmax(-1),
            logits[other].detach().log_softmax(-1),
            log_target=True,
            reduction="none",
        ).sum(-1)  # (N,)
        expected_kd = (kl * learns[index]).sum() / labels.numel()
        torch.testing.assert_close(losses["kd_loss"], expected_kd.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses["kd_share"], learns[index].float().mean())
        expected = 0.5 * nll[index].mean() + 0.5 * expected_kd
        torch.testing.assert_close(losses["loss"], expected.detach(), rtol=1e-4, atol=1e-6)
        (grad,) = torch.autograd.grad(losses["loss"], features[index], retain_graph=True)  # (N, H)
        (reference,) = torch.autograd.grad(expected, features[index], retain_graph=True)
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-7)


class RecordingKL(ForwardKLLoss):
    """Forward KL that keeps every target it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def forward(self, student_logits, teacher_logits, labels=None):
        self.targets.append(teacher_logits.detach().clone())
        return super().forward(student_logits, teacher_logits, labels)


class CountingCohort(MutualDistillationModule):
    """Records every peer forward pass: (peer, with gradients)."""

    def peer_forward(self, index, batch):
        self.calls.append((index, torch.is_grad_enabled()))
        return super().peer_forward(index, batch)


class FirstBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = {k: v.clone() for k, v in batch.items()}


@pytest.mark.parametrize("update", ["alternate", "simultaneous"])
def test_alternate_and_simultaneous_updates_see_what_the_docs_say(datamodule, tmp_path, update):
    """Peer 0 learns from peer 1 before the step in both modes; peer 1 then learns from peer 0 AFTER its
    update (alternate) or before it (simultaneous). Alternate pays one more (no-grad) forward pass."""
    torch.manual_seed(0)
    loss = RecordingKL()
    cohort = _cohort(
        datamodule, [SMALL, WIDER], cls=CountingCohort, loss=loss, update=update, chunk_size=None
    )
    cohort.calls = []
    before = [copy.deepcopy(peer) for peer in cohort.peers]
    first = FirstBatch()
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[first]).fit(cohort, datamodule)

    keep, _ = next_token_targets(first.batch["labels"])

    def logits(model):
        with torch.no_grad():
            return model(first.batch["input_ids"], attention_mask=first.batch["attention_mask"]).logits[
                :, :-1
            ][keep]

    assert len(loss.targets) == 2
    torch.testing.assert_close(loss.targets[0], logits(before[1]), rtol=1e-5, atol=1e-5)
    peer0_after, peer0_before = logits(cohort.peers[0]), logits(before[0])
    assert not torch.allclose(peer0_after, peer0_before, atol=1e-4), "the step changed peer 0"
    seen = peer0_after if update == "alternate" else peer0_before
    torch.testing.assert_close(loss.targets[1], seen, rtol=1e-5, atol=1e-5)
    forwards = [(0, True), (1, True)] + ([(0, False)] if update == "alternate" else [])
    assert cohort.calls == forwards


class ModeLog(Callback):
    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.modes.append(pl_module.peers[0].training)
        self.states[trainer.global_step] = {f"peers.{i}": _state(p) for i, p in enumerate(pl_module.peers)}


def test_a_frozen_peer_is_a_teacher_then_trains_with_the_student(datamodule, tmp_path):
    """Frozen for 3 steps, a pretrained peer makes the cohort ordinary KD from it (the same student as a
    DistillationModule with that teacher); from step 3 on it is updated too."""
    torch.manual_seed(0)
    teacher, student = _model(datamodule, {**WIDER, "n_layer": 2}), _model(datamodule, SMALL)
    optimizer = partial(torch.optim.AdamW, lr=3e-3)
    kd = tiny_module(
        datamodule, teacher=copy.deepcopy(teacher), student=copy.deepcopy(student), optimizer=optimizer
    )
    tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(kd, datamodule)

    cohort = _cohort(datamodule, [copy.deepcopy(teacher), copy.deepcopy(student)], frozen_steps=[3, 0])
    log = ModeLog()
    trainer = tiny_trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[log])
    trainer.fit(cohort, datamodule)

    # to float rounding: the KD module takes CE + forward KL's gradient in closed form
    torch.testing.assert_close(log.states[3]["peers.1"], _state(kd.student), rtol=1e-5, atol=1e-5)
    _assert_same(log.states[3]["peers.0"], _state(teacher))
    assert not torch.equal(log.states[5]["peers.0"]["transformer.h.0.mlp.c_fc.weight"],
                           _state(teacher)["transformer.h.0.mlp.c_fc.weight"])  # fmt: skip
    assert log.modes == [False, False, False, True, True], "eval mode while frozen, as a teacher"
    teacher_params = list(cohort.peers[0].parameters())
    assert all(len(trainer.optimizers[0].state[p]) > 0 for p in teacher_params), "its optimizer took over"


class StateLog(Callback):
    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = {f"peers.{i}": _state(p) for i, p in enumerate(pl_module.peers)}


def test_burn_in_trains_on_the_labels_alone_then_distils(datamodule, tmp_path):
    """With burn_in_steps 2 the first 2 steps are those of kd_ratio 0 (exactly), the third distils."""
    torch.manual_seed(0)
    peers = [_model(datamodule, SMALL), _model(datamodule, WIDER)]
    logs = {}
    for name, kwargs in {
        "alone": {"kd_ratio": 0.0},
        "burn-in": {"kd_ratio": 0.5, "burn_in_steps": 2},
    }.items():
        cohort = _cohort(datamodule, [copy.deepcopy(p) for p in peers], **kwargs)
        logs[name] = StateLog()
        tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[logs[name]]).fit(
            cohort, datamodule
        )
    for peer in ("peers.0", "peers.1"):
        _assert_same(logs["burn-in"].states[2][peer], logs["alone"].states[2][peer])
        key = "transformer.h.0.mlp.c_fc.weight"
        assert not torch.equal(logs["burn-in"].states[3][peer][key], logs["alone"].states[3][peer][key])


class RateLog(Callback):
    def __init__(self) -> None:
        self.rates: list[list[float]] = []
        self.ratios: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append([opt.param_groups[0]["lr"] for opt in pl_module.cohort.optimizers])
        self.ratios.append(list(pl_module.kd_ratios))


def test_curriculum_stages_set_every_peers_rate_and_knobs_for_all_or_one_peer(datamodule, tmp_path):
    cohort = _cohort(
        datamodule,
        [SMALL, WIDER],
        names=["left", "right"],
        optimizers=[partial(torch.optim.AdamW, lr=1e-3), partial(torch.optim.AdamW, lr=4e-3)],
    )
    stages = [
        Stage("one", steps=2, lr_scale=0.5, knobs={"peer1.kd_ratio": 0.9}),
        Stage("two", steps=1, knobs={"left.kd_ratio": 0.1}),
        Stage("all", steps=1, lr=1e-4, knobs={"kd_ratio": 0.2, "temperature": 2.0}),
    ]
    log = RateLog()  # before the curriculum: it sees the step's settings before the stage moves on
    curriculum = CurriculumCallback(stages, on_regression="continue")
    tiny_trainer(tmp_path, max_steps=10, limit_val_batches=0, callbacks=[log, curriculum]).fit(
        cohort, datamodule
    )
    rates = [rate for step in log.rates for rate in step]
    assert rates == pytest.approx([5e-4, 2e-3] * 2 + [1e-3, 4e-3] + [1e-4, 1e-4])
    assert log.ratios == [[0.5, 0.9], [0.5, 0.9], [0.1, 0.9], [0.2, 0.2]]
    assert cohort.loss.temperature == 2.0
    assert {
        "kd_ratio",
        "peer0.kd_ratio",
        "left.kd_ratio",
        "right.kd_ratio",
        "temperature",
    } <= cohort.knob_names()
    with pytest.raises(ConfigError, match="peer2.kd_ratio"):
        cohort.apply_knobs({"peer2.kd_ratio": 0.5})


def test_each_peer_exports_by_index_and_by_name_and_reloads_with_transformers(datamodule, tmp_path, capsys):
    torch.manual_seed(0)
    cohort = _cohort(datamodule, [SMALL, WIDER], names=["big", "small"])
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = tiny_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(cohort, datamodule)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert set(saved["distilkit"]["models"]) == {"peers.0", "peers.1"}
    restored = MutualDistillationModule.load_from_checkpoint(last, weights_only=True)
    ids = next(iter(datamodule.val_dataloader()))["input_ids"]
    capsys.readouterr()
    print_summary(trainer, Console())  # issue 21: a command per peer, with --peer, validated or not
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("export ")]
    commands = dict(line.split(": ", 1) for line in printed)
    assert list(commands) == ["export peer big", "export peer small"], printed
    for index, peer in enumerate(("0", "small")):
        out = tmp_path / f"export-{peer}"
        if peer == "small":  # the summary's command, as printed
            assert shlex.split(commands["export peer small"])[-4:] == [
                "--output_dir",
                str(out),
                "--peer",
                peer,
            ]
            run_cli(*shlex.split(commands["export peer small"])[1:])
        else:
            run_cli("export", "--ckpt_path", str(last), "--output_dir", str(out), "--peer", peer)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert AutoTokenizer.from_pretrained(out).vocab_size == datamodule.vocab_size
        with torch.no_grad():
            expected = cohort.peers[index].eval()(ids).logits
            torch.testing.assert_close(model(ids).logits, expected)
            torch.testing.assert_close(restored(ids, peer=index), expected)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("export", "--ckpt_path", str(last), "--output_dir", str(tmp_path / "x"), "--peer", "teacher")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "peer='teacher': names no peer of this checkpoint (it holds 0 (big), 1 (small))" in err
    with pytest.raises(SystemExit) as exit_info:  # issue 21.5: without --peer, say --peer
        run_cli("export", "--ckpt_path", str(last), "--output_dir", str(tmp_path / "x"))
    err = " ".join(capsys.readouterr().err.split())
    assert (
        exit_info.value.code == 2
        and "error: peer=None: is needed: the checkpoint holds a cohort of 2 peers" in err
    )
    assert "choose one with --peer 0 (an index) or --peer NAME" in err


def test_evaluate_scores_every_peer_of_a_cohort_checkpoint_or_the_one_asked_for(datamodule, tmp_path, corpus):
    from distilkit.commands.evaluate import evaluate

    torch.manual_seed(0)
    cohort = _cohort(datamodule, [SMALL, WIDER], names=["big", "small"])
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = tiny_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(cohort, datamodule)
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    options = dict(data_files=str(corpus), block_size=32, batch_size=4, progress=False)
    rows = evaluate([last], **options)
    assert [row["model"] for row in rows] == [f"{last} (peer big)", f"{last} (peer small)"]
    assert rows[0]["ppl"] != rows[1]["ppl"]
    only = evaluate([last], peer="small", **options)
    assert [row["model"] for row in only] == [f"{last} (peer small)"] and only[0]["ppl"] == rows[1]["ppl"]


def test_predict_gives_each_peers_next_token_nll(datamodule):
    torch.manual_seed(0)
    cohort = _cohort(datamodule, [SMALL, WIDER], chunk_size=16).eval()
    batch = next(iter(datamodule.val_dataloader()))
    batch["labels"][0, 10:] = -100  # masked positions predict nothing
    keep, labels = next_token_targets(batch["labels"])
    with torch.no_grad():
        result = cohort.predict_step(batch, 0)
        assert set(result) == {"peer0", "peer1"}
        for index in range(2):
            logits = cohort(batch["input_ids"], batch["attention_mask"], peer=index)[:, :-1][keep]
            nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            torch.testing.assert_close(result[f"peer{index}"][keep], nll, rtol=1e-4, atol=1e-5)
            assert result[f"peer{index}"][~keep].isnan().all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"peers": [SMALL]}, "model.peers"),
        ({"kd_ratio": [0.5]}, "model.kd_ratio"),
        ({"kd_ratio": 1.5}, "model.kd_ratio"),
        ({"weights": [1.0, 0.0]}, "model.weights"),
        ({"frozen_steps": [2, 3]}, "model.frozen_steps"),
        ({"names": ["a", "a"]}, "model.names"),
        ({"update": "both"}, "model.update"),
        ({"burn_in_steps": -1}, "model.burn_in_steps"),
        ({"kd_positions": "best"}, "model.kd_positions"),
    ],
)
def test_bad_settings_name_the_field(datamodule, kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cohort(datamodule, **{"peers": [SMALL, SMALL], **kwargs})


# --------------------------------------------------------------------------------------------------- slow
def _cohort_recipe(path: Path, corpus, tokenizer_dir, cache_dir, model: dict, **trainer) -> Path:
    recipe = tiny_recipe(path, corpus, tokenizer_dir, cache_dir, **trainer)
    config = yaml.safe_load(recipe.read_text())
    config["model"] = {"class_path": "distilkit.MutualDistillationModule", "init_args": model}
    recipe.write_text(yaml.safe_dump(config))
    return recipe


def _fit(recipe: Path, run_dir: Path, *overrides: str, wait: bool = True) -> subprocess.Popen | str:
    """`distilkit fit` in a new process (``wait=False``: started, not waited for)."""
    command = [sys.executable, "-m", "distilkit.cli", "fit", "--config", str(recipe)]
    command += ["--trainer.default_root_dir", str(run_dir), *overrides]
    paths = [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]  # tests/: helpers.SlowSteps
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _assert_same_checkpoints(a: Path, b: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    one, two = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert one["global_step"] == two["global_step"]
    assert one["state_dict"].keys() == two["state_dict"].keys()
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=rtol, atol=atol, msg=key)
    for x, y in zip(one["optimizer_states"][0]["peers"], two["optimizer_states"][0]["peers"], strict=True):
        for param, state in x["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(y["state"][param][name], value, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_a_killed_cohort_resumes_exactly(tmp_path, corpus, tokenizer_dir, cache_dir, capsys):
    """SIGKILL mid-run, resume from last.ckpt: the same peers, optimizer states and logged losses as an
    uninterrupted run (dropout on, rotating alternate order, a rate and a schedule per peer)."""
    model = {
        "peers": [TINY_STUDENT, {**TINY_STUDENT, "n_embd": 48}],
        "names": ["a", "b"],
        "order": "rotate",
        "gradient_clip_val": 1.0,
        "optimizers": [
            {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
            {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
        ],
        "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"total_iters": 8}},
    }
    recipe = _cohort_recipe(
        tmp_path / "mutual.yaml", corpus, tokenizer_dir, cache_dir, model, max_steps=8, val_check_interval=4
    )
    every_step = ("--checkpoint.every_n_train_steps", "1")
    fit_run(recipe, tmp_path / "straight", *every_step)  # in this process (no second start-up to pay)
    output = capsys.readouterr().out
    assert "a val ppl" in output and "b val ppl" in output  # issue 21.7: by name
    last = tmp_path / "straight" / "checkpoints" / "last.ckpt"
    assert f"export peer b: distilkit export --ckpt_path '{last}' --output_dir" in output
    assert output.rstrip().endswith("export-b' --peer b"), output[-500:]
    assert "peer1 val ppl" not in output and "none: the peers teach each other (a, b)" in output

    killed = tmp_path / "killed"
    slow = [{"class_path": "helpers.SlowSteps", "init_args": {"marker": str(tmp_path / "m"), "at_step": 0}}]
    process = _fit(
        recipe, killed, *every_step, "--trainer.callbacks", json.dumps(slow), wait=False
    )  # 0.3 s a step
    last = killed / "checkpoints" / "last.ckpt"
    killed_at = kill_when_checkpointed(process, last, at_step=3)
    assert 3 <= killed_at < 8, "the run was not killed mid-training"
    fit_run(recipe, killed, *every_step, "--ckpt_path", "last")

    _assert_same_checkpoints(tmp_path / "straight" / "checkpoints" / "last.ckpt", last)
    assert csv_rows(killed) == csv_rows(tmp_path / "straight")


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    """Each peer's gradients are averaged over the processes before its update (alternate: one backward
    pass per peer), so two processes with half the batch train as one process."""
    model = {"peers": [SMALL, WIDER], "gradient_clip_val": 0.5, "update": "alternate"}
    recipe = _cohort_recipe(
        tmp_path / "mutual.yaml", corpus, tokenizer_dir, cache_dir, model, max_steps=4, val_check_interval=4
    )
    fit_run(recipe, tmp_path / "one", "--data.init_args.batch_size", "4")
    two = ["--data.init_args.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    output = _fit(recipe, tmp_path / "two", *two, "--trainer.strategy", "ddp")
    assert "Starting with 2 processes" in output and "gloo" in output

    one, two_rows = csv_rows(tmp_path / "one"), csv_rows(tmp_path / "two")
    assert [row[0] for row in one] == [row[0] for row in two_rows]
    for a, b in zip(one, two_rows, strict=True):
        for x, y in zip(a[1:], b[1:], strict=True):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5 * max(1.0, abs(x)))
    _assert_same_checkpoints(
        tmp_path / "one" / "checkpoints" / "last.ckpt",
        tmp_path / "two" / "checkpoints" / "last.ckpt",
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "override,message",
    [
        (["--trainer.gradient_clip_val", "1.0"], "trainer.gradient_clip_val=1.0: is not used by a cohort"),
        (["--trainer.accumulate_grad_batches", "2"], "trainer.accumulate_grad_batches=2: is not supported"),
        (
            ["--trainer.max_steps", "5", "--model.init_args.lr_scheduler.init_args.total_steps", "900"],
            "model.lr_scheduler.init_args.total_steps=900: is not the run's length of 5 optimizer steps",
        ),
    ],
)
def test_the_mutual_recipe_refuses_what_a_cohort_cannot_do_in_one_line(
    override, message, tmp_path, cache_dir, capsys
):
    """Trainer settings of automatic optimization and a schedule shorter than the run: refused before any
    step, with the setting to use (Lightning would raise a traceback, or stop at step 301)."""
    root = Path(__file__).parents[2]
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        fit_run(
            root / "recipes" / "mutual.yaml", run_dir, "--data.init_args.cache_dir", str(cache_dir), *override
        )
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


def test_the_online_teacher_recipes_schedule_error_names_the_field_it_has(tmp_path, cache_dir, capsys):
    """Issue 21.5: recipes/online_teacher.yaml gives one schedule per peer (``lr_schedulers``); a length there
    that is not the run's is refused naming that list's entry, not ``lr_scheduler`` (which it has not), and
    the fix it gives (leave the length out) is the recipe as shipped."""
    root = Path(__file__).parents[2]
    config = yaml.safe_load((root / "recipes" / "online_teacher.yaml").read_text())
    assert "lr_scheduler" not in config["model"]["init_args"], "the recipe as shipped leaves the lengths out"
    config["model"]["init_args"]["lr_schedulers"][1]["init_args"]["total_steps"] = 300
    recipe = tmp_path / "online_teacher.yaml"
    recipe.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        fit_run(
            recipe, tmp_path / "run", "--data.init_args.cache_dir", str(cache_dir), "--trainer.max_steps", "5"
        )
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "error: model.lr_schedulers[1].init_args.total_steps=300: is not the run's length of 5" in err
    assert "leave it out (the schedule then lasts the run)" in err
