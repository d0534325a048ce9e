"""CurriculumCallback: the learning-rate plan, plateaus, rollbacks, knobs, resume, validation, the plot."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import TINY_STUDENT, tiny_module, tiny_recipe, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from distilkit import CurriculumCallback, DistillationModule, Stage
from distilkit.callbacks.curriculum import scheduled_lr
from distilkit.cli import main
from distilkit.errors import ConfigError


class Recorder(Callback):
    """Records, at every optimizer step, the rate used and the curriculum's stage."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.stages: list[int] = []
        self.knobs: list[tuple[float | None, float | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        loss = getattr(pl_module, "loss", None)
        self.knobs.append((getattr(pl_module, "kd_ratio", None), getattr(loss, "temperature", None)))
        curriculum = next(c for c in trainer.callbacks if isinstance(c, CurriculumCallback))
        self.stages.append(curriculum.state.stage)


def fit(datamodule, tmp_path, stages, *, module=None, max_steps=50, **kwargs):
    curriculum = CurriculumCallback(stages, **kwargs.pop("curriculum", {}))
    recorder = Recorder()
    module = module or tiny_module(datamodule, teacher=None, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    trainer = tiny_trainer(tmp_path, max_steps=max_steps, callbacks=[curriculum, recorder], **kwargs)
    trainer.fit(module, datamodule)
    return trainer, curriculum, recorder, module


def test_scheduled_lr_formulas():
    assert scheduled_lr(1.0, 0, 4, 10, "cosine") == 0.25
    assert scheduled_lr(1.0, 3, 4, 10, "cosine") == 1.0
    assert scheduled_lr(1.0, 4, 4, 10, "cosine") == 1.0
    assert scheduled_lr(1.0, 7, 4, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert scheduled_lr(1.0, 7, 4, 10, "linear") == pytest.approx(0.5)
    assert scheduled_lr(1.0, 9, 0, 10, "constant") == 1.0


def test_the_rate_at_each_step_follows_the_plan_and_training_stops_after_the_last_stage(datamodule, tmp_path):
    stages = [
        Stage("warm", lr=1e-3, steps=4, warmup_steps=2),
        Stage("flat", lr_scale=0.5, steps=3),
        Stage("cool", lr=2e-3, steps=4, anneal="linear"),
    ]
    trainer, _, recorder, _ = fit(datamodule, tmp_path, stages, max_steps=50)
    expected = [0.5e-3, 1e-3, 1e-3, 1e-3] + [0.005] * 3 + [2e-3, 1.5e-3, 1e-3, 0.5e-3]
    assert recorder.lrs == pytest.approx(expected)
    assert recorder.stages == [0] * 4 + [1] * 3 + [2] * 4
    assert trainer.global_step == 11


def test_epoch_and_token_lengths(datamodule, tmp_path):
    tokens_per_step = 4 * 32  # batch 4 x block 32
    stages = [
        Stage("epoch", lr=1e-3, epochs=1),
        Stage("tokens", lr=2e-3, tokens=3 * tokens_per_step),
        Stage("cosine", lr=1e-3, steps=4, anneal="cosine"),
    ]
    _, _, recorder, _ = fit(datamodule, tmp_path, stages, limit_train_batches=3)
    assert recorder.stages == [0] * 3 + [1] * 3 + [2] * 4
    assert recorder.lrs[6:] == pytest.approx([scheduled_lr(1e-3, i, 0, 4, "cosine") for i in range(4)])


class ScriptedValidation(DistillationModule):
    """Logs a scripted ``val/score`` at each validation (one value per check) to drive the callback."""

    script: list[float]

    def validation_step(self, batch, batch_idx):
        checks = (
            self.trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed // 2
        )  # 2 batches/check
        self.log("val/score", self.script[min(checks, len(self.script) - 1)])


def scripted(datamodule, script):
    module = ScriptedValidation(
        student=TINY_STUDENT,
        vocab_size=datamodule.vocab_size,
        block_size=datamodule.block_size,
        eos_token_id=datamodule.eos_token_id,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
    )
    module.script = script
    return module


def test_a_plateau_advances_the_stage(datamodule, tmp_path):
    module = scripted(datamodule, [5.0, 4.0, 4.0, 4.0, 4.0, 4.0])
    stages = [
        Stage("until flat", lr=1e-3, until="plateau", patience=2, max_steps=20),
        Stage("next", lr=2e-3, steps=2),
    ]
    _, _, recorder, _ = fit(
        datamodule,
        tmp_path,
        stages,
        module=module,
        val_check_interval=1,
        curriculum={"monitor": "val/score", "on_regression": "continue"},
    )
    # checks after steps 1..4: 5.0 (best), 4.0 (better), 4.0 (bad 1), 4.0 (bad 2 -> advance after step 4)
    assert recorder.stages == [0] * 4 + [1] * 2


def test_a_plateau_stage_is_capped_by_max_steps(datamodule, tmp_path):
    module = scripted(datamodule, [5.0 - i for i in range(50)])  # always improving
    stages = [Stage("until flat", lr=1e-3, until="plateau", max_steps=3), Stage("next", lr=2e-3, steps=1)]
    _, _, recorder, _ = fit(
        datamodule, tmp_path, stages, module=module, val_check_interval=1, curriculum={"monitor": "val/score"}
    )
    assert recorder.stages == [0, 0, 0, 1]


def test_a_regression_rolls_back_lowers_the_rate_and_then_advances(datamodule, tmp_path):
    # checks after steps 1..: 3.0 (start, best), 2.0 (best), 9.0 (worse than start: rollback 1),
    # 9.0 (rollback 2), 9.0 (retries exhausted: restore and advance)
    module = scripted(datamodule, [3.0, 2.0, 9.0, 9.0, 9.0, 9.0])
    kept: dict[str, torch.Tensor] = {}

    class KeepBest(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.global_step == 2:
                kept.update({k: v.clone() for k, v in pl_module.student.state_dict().items()})

    stages = [Stage("risky", lr=1e-2, steps=100), Stage("after", lr=1e-3, steps=1)]
    curriculum = CurriculumCallback(stages, monitor="val/score", on_regression="rollback", max_retries=2)
    recorder = Recorder()
    restored: list[bool] = []

    class CheckRestore(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:  # right after the first rollback
                restored.append(
                    all(torch.equal(v, kept[k]) for k, v in pl_module.student.state_dict().items())
                )

    trainer = tiny_trainer(
        tmp_path,
        max_steps=50,
        val_check_interval=1,
        callbacks=[KeepBest(), curriculum, recorder, CheckRestore()],
    )
    trainer.fit(module, datamodule)
    assert restored == [True], "the first rollback did not restore the best point's weights"
    assert recorder.lrs[:3] == pytest.approx([1e-2, 1e-2, 1e-2])
    assert recorder.lrs[3] == pytest.approx(5e-3) and recorder.lrs[4] == pytest.approx(2.5e-3)
    assert recorder.stages == [0, 0, 0, 0, 0, 1]
    assert trainer.global_step == 6


def test_a_non_finite_loss_counts_as_a_regression(datamodule, tmp_path):
    class Poisoned(DistillationModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 1 else loss

    module = Poisoned(
        student=TINY_STUDENT,
        vocab_size=datamodule.vocab_size,
        block_size=datamodule.block_size,
        eos_token_id=datamodule.eos_token_id,
        nonfinite="skip",  # the module skips the update; the curriculum still sees the bad loss
    )
    stages = [Stage("one", lr=1e-3, steps=4), Stage("two", lr=1e-3, steps=1)]
    _, _, recorder, _ = fit(
        datamodule, tmp_path, stages, module=module, curriculum={"on_regression": "advance"}
    )
    assert recorder.stages == [0, 0, 1]
    assert all(torch.isfinite(p).all() for p in module.student.parameters()), "the bad step was kept"


def test_stage_knobs_reach_the_module_and_the_loss(datamodule, tmp_path):
    seen: list[tuple[float, float]] = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module.kd_ratio, pl_module.loss.temperature))

    module = tiny_module(datamodule)
    stages = [
        Stage("soft", lr=1e-3, steps=2, knobs={"kd_ratio": 0.9, "temperature": 3.0}),
        Stage("hard", lr=1e-3, steps=2, knobs={"kd_ratio": 0.2, "temperature": 1.0}),
    ]
    trainer = tiny_trainer(tmp_path, max_steps=10, callbacks=[CurriculumCallback(stages), Watch()])
    trainer.fit(module, datamodule)
    assert seen == [(0.9, 3.0), (0.9, 3.0), (0.2, 1.0), (0.2, 1.0)]
    assert trainer.callback_metrics["curriculum/temperature"] == 1.0


def test_a_later_stages_bad_knob_value_is_refused_before_the_first_step(datamodule, tmp_path):
    module = tiny_module(datamodule)
    for knobs, field in [({"kd_ratio": 1.5}, "kd_ratio"), ({"temperature": -1.0}, "temperature")]:
        stages = [Stage("fine", lr=1e-3, steps=2), Stage("bad", lr=1e-3, steps=2, knobs=knobs)]
        with pytest.raises(ConfigError, match=rf"^stages\[1\] \(bad\)\.knobs=.*{field}") as caught:
            fit(datamodule, tmp_path, stages, module=module)
        assert module.global_step == 0, caught.value
        assert (module.kd_ratio, module.loss.temperature) == (0.5, 1.0), "the settings put back"


def test_stages_are_tried_before_training_and_the_settings_put_back(datamodule, tmp_path):
    seen: list[tuple[float, float]] = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module.kd_ratio, pl_module.loss.temperature))

    module = tiny_module(datamodule, kd_ratio=0.5)
    stages = [
        Stage("as built", lr=1e-3, steps=2),
        Stage("soft", lr=1e-3, steps=1, knobs={"temperature": 2.0}),
    ]
    trainer = tiny_trainer(tmp_path, max_steps=10, callbacks=[CurriculumCallback(stages), Watch()])
    trainer.fit(module, datamodule)
    assert seen == [(0.5, 1.0), (0.5, 1.0), (0.5, 2.0)]


def test_an_unknown_knob_is_refused_when_training_starts(datamodule, tmp_path):
    stages = [Stage("x", lr=1e-3, steps=2, knobs={"betta": 0.5})]
    with pytest.raises(ConfigError, match="betta"):
        fit(datamodule, tmp_path, stages)


def test_knobs_for_a_module_without_knobs_are_refused_naming_it(tmp_path):
    class Plain(BoringModel):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    stages = [Stage("x", lr=1e-3, steps=2, knobs={"kd_ratio": 0.5})]
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=2, callbacks=[CurriculumCallback(stages)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        trainer.fit(Plain())
    assert (
        str(refused.value)
        == "stages[0].knobs=['kd_ratio']: are not knobs of Plain; drop them (Plain has none)."
    )


def test_a_trainer_lr_scheduler_is_refused(datamodule, tmp_path):
    module = tiny_module(
        datamodule, teacher=None, lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    )
    with pytest.raises(ConfigError, match="model.lr_scheduler"):
        fit(datamodule, tmp_path, [Stage("x", lr=1e-3, steps=2)], module=module)


def test_resume_mid_stage_is_exact(datamodule, tmp_path):
    stages = [
        Stage("a", lr=1e-3, steps=3, warmup_steps=2, knobs={"kd_ratio": 0.9}),
        Stage("b", lr=4e-3, steps=6, anneal="cosine", knobs={"temperature": 2.0}),
    ]

    def run(root, max_steps, ckpt_path=None):
        torch.manual_seed(0)
        curriculum, recorder = CurriculumCallback(stages), Recorder()
        module = tiny_module(datamodule, teacher=None)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
        trainer = tiny_trainer(
            root, max_steps=max_steps, enable_checkpointing=True, callbacks=[curriculum, recorder, checkpoint]
        )
        trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        return curriculum, recorder

    straight, straight_lrs = run(tmp_path / "straight", 9)
    interrupted, _ = run(tmp_path / "split", 5)
    saved = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)["callbacks"]
    saved_state = next(v for k, v in saved.items() if k.startswith("CurriculumCallback"))
    assert saved_state["state"]["stage"] == 1 and saved_state["state"]["start_step"] == 3
    resumed, resumed_lrs = run(tmp_path / "split", 9, ckpt_path=str(tmp_path / "split" / "last.ckpt"))
    assert resumed_lrs.lrs == pytest.approx(straight_lrs.lrs[5:])
    assert resumed_lrs.stages == straight_lrs.stages[5:] == [1] * 4
    # the knobs stage a set hold through stage b, after the resume too
    assert resumed_lrs.knobs == straight_lrs.knobs[5:] == [(0.9, 2.0)] * 4
    schedule_keys = (
        "stage",
        "start_step",
        "retries",
        "lr_factor",
        "tokens",
        "epochs",
        "tokens_per_step",
        "knobs",
        "settings",
    )
    assert {k: getattr(resumed.state, k) for k in schedule_keys} == {
        k: getattr(straight.state, k) for k in schedule_keys
    }
    # the best point kept before the interruption came back from the checkpoint
    best = saved_state["best_point"]["module"]
    assert best.keys() == interrupted.best_point["module"].keys()
    assert all(torch.equal(best[k], interrupted.best_point["module"][k]) for k in best)


@pytest.mark.parametrize(
    "stages,match",
    [
        ([], "is empty"),
        ([Stage("x", lr=1e-3)], "needs a length"),
        ([Stage("x", lr=1e-3, steps=2, epochs=1)], "more than one length"),
        ([Stage("x", lr=1e-3, lr_scale=2.0, steps=2)], "both lr and lr_scale"),
        ([Stage("x", lr=-1e-3, steps=2)], r"stages\[0\] \(x\).lr=-0.001: is negative"),
        ([Stage("x", lr=1e-3, steps=0)], "is zero"),
        ([Stage("x", lr=1e-3, steps=2, anneal="exp")], "is not an anneal"),
        ([Stage("x", lr=1e-3, steps=2, knobs={"kd_ratio": "high"})], "is not a number"),
    ],
)
def test_invalid_stage_lists_get_clear_errors(stages, match):
    with pytest.raises(ConfigError, match=match):
        CurriculumCallback(stages)


def test_the_learning_curve_is_drawn_and_distilkit_plot_redraws_it(
    tmp_path, corpus, tokenizer_dir, cache_dir
):

    recipe = tiny_recipe(
        tmp_path / "tiny.yaml",
        corpus,
        tokenizer_dir,
        cache_dir,
        max_steps=20,
        callbacks=[
            {
                "class_path": "distilkit.CurriculumCallback",
                "init_args": {
                    "stages": [
                        {"name": "warm", "lr": 0.001, "steps": 2, "warmup_steps": 2},
                        {"name": "main", "lr": 0.003, "steps": 3, "anneal": "cosine"},
                    ]
                },
            }
        ],
    )
    run_dir = tmp_path / "run"
    main(["fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir)])
    png = run_dir / "learning_curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"curriculum/stage", "curriculum/lr", "curriculum/retries"} <= set(header)
    png.unlink()
    main(["plot", str(run_dir)])
    assert png.is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
