"""Cross-tokenizer distillation on the quickstart: bits per byte kept, and what a step costs.

The student (2 x 128) trains ``--steps`` steps with ``recipes/cross_tokenizer.yaml`` (``distilkit fit``): its
tokenizer is a SentencePiece-style BPE of 4,096 tokens trained on the corpus, the teacher's
(``recipes/teacher``) a byte-level BPE of 4,096. Variants, each with every seed of ``--seeds``:

- student alone on its tokenizer (no teacher), ULD, GOLD (the recipe);
- the reference: the same student on the teacher's tokenizer, alone and with ordinary KD (forward KL, the
  quickstart).

Same data, steps, schedule and kd_ratio for all. Reported: the final ``val/bpb`` (comparable across
tokenizers: the same validation documents) per seed and its mean, and the share of same-tokenizer KD's gain
that each keeps, each measured against the student alone on its own tokenizer:
``(bpb alone_s - bpb) / (bpb alone_t - bpb KD_t)``.

Step cost: one training step (student forward, teacher forward, the chunked loss, backward, AdamW; for the
cross-tokenizer variants the alignment of the batch too, done in the step) of each variant on the same
training batches, interleaved rounds, medians, as a ratio to the same-tokenizer KD step; then the pieces of
the cross-tokenizer step alone (alignment, the loss on the step's logits). Run:
``python benchmarks/cross_tokenizer.py [--steps 300] [--seeds 0 1] [--output_dir runs/bench-cross-tokenizer]``
(``--part quality`` or ``--part speed`` runs one half; ``--batch_size`` / ``--block_size`` shrink every
variant's data alike, for a quick run).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import warnings
from collections.abc import Callable
from itertools import cycle
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, interleaved_medians, print_table

from distilkit import DistillationModule, TextDataModule
from distilkit.cli import main as distilkit
from distilkit.losses import DistillationLoss, ForwardKLLoss, GOLDLoss, ULDLoss
from distilkit.teachers import for_data

RECIPE = ROOT / "recipes" / "cross_tokenizer.yaml"
TEACHER = ROOT / "recipes" / "teacher"
STUDENT = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4}
STUDENT_TOKENIZER = {"vocab_size": 4096, "style": "sentencepiece"}
CORPUS = "builtin:python-reference"
LOSSES = {"ULD": "distilkit.losses.ULDLoss", "GOLD": "distilkit.losses.GOLDLoss"}
NO_TEACHER = ["--model.init_args.teacher", "null"]
TEACHER_TOKENS = ["--data.init_args.tokenizer", str(TEACHER)]
FORWARD_KL = ["--model.init_args.loss", '{"class_path": "distilkit.losses.ForwardKLLoss"}']
#: ``--batch_size`` / ``--block_size`` overrides of the recipe's data (every variant alike)
SIZE: list[str] = []

#: variant -> (tokenizer, the overrides of the recipe)
VARIANTS = {
    "student alone": ("SentencePiece BPE 4096", NO_TEACHER),
    "ULD": ("SentencePiece BPE 4096", ["--model.init_args.loss", f'{{"class_path": "{LOSSES["ULD"]}"}}']),
    "GOLD": ("SentencePiece BPE 4096", []),
    "student alone, teacher's tokenizer": (
        "the teacher's byte-level BPE 4096",
        [*TEACHER_TOKENS, *NO_TEACHER],
    ),
    "same-tokenizer KD (reference)": ("the teacher's byte-level BPE 4096", [*TEACHER_TOKENS, *FORWARD_KL]),
}


def fit(name: str, seed: int, output: Path, steps: int, overrides: list[str]) -> dict[str, float]:
    """The last validation row of a ``distilkit fit`` of the recipe (run once; read back if already done)."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    run_dir = output / "runs" / f"{slug}-{seed}"
    if not (run_dir / "done").is_file():
        place = ["--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(steps), *SIZE]
        place += ["--trainer.val_check_interval", str(min(100, steps)), "--seed_everything", str(seed)]
        quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        distilkit(["fit", "--config", str(RECIPE), *place, *quiet, *overrides])
        (run_dir / "done").write_text("")
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/bpb")]
    return {key: float(value) for key, value in rows[-1].items() if key.startswith("val/") and value}


#: ``--variants`` keys, in the order of :data:`VARIANTS`
KEYS = dict(zip(("alone", "uld", "gold", "alone_t", "kd"), VARIANTS, strict=True))


def quality(
    output: Path, steps: int, seeds: list[int], keys: list[str] | None = None
) -> dict[str, list[dict[str, float]]]:
    """Every variant's last validation metrics, per seed (``keys``: run only these variants, in this order;
    several processes may share ``output``, each with other variants, and a last one with all prints)."""
    names = [KEYS[key] for key in keys] if keys else list(VARIANTS)
    return {name: [fit(name, seed, output, steps, VARIANTS[name][1]) for seed in seeds] for name in names}


def print_quality(results: dict[str, list[dict[str, float]]], steps: int, seeds: list[int]) -> None:
    bpb = {name: [row["val/bpb"] for row in rows] for name, rows in results.items()}
    mean = {name: statistics.mean(values) for name, values in bpb.items()}
    gain = mean["student alone, teacher's tokenizer"] - mean["same-tokenizer KD (reference)"]
    print(
        f"\nval/bpb after {steps} steps{' ' + ' '.join(SIZE) if SIZE else ''}, seeds {seeds} (lower is "
        "better); gain kept = gain over the student"
    )
    print("alone on its own tokenizer / same-tokenizer KD's gain over the student alone on the teacher's")
    rows = []
    for name, (tokenizer, _) in VARIANTS.items():
        alone = "student alone" if tokenizer.startswith("Sentence") else "student alone, teacher's tokenizer"
        kept = "-" if name == alone else f"{100 * (mean[alone] - mean[name]) / gain:.0f}%"
        shares = [row.get("val/compared_share") for row in results[name]]
        share = "-" if None in shares else f"{statistics.mean(shares):.2f}"  # type: ignore[arg-type]
        per_seed = " / ".join(f"{value:.4f}" for value in bpb[name])
        rows.append([name, tokenizer, per_seed, f"{mean[name]:.4f}", kept, share])
    print_table(["variant", "student tokenizer", "val/bpb per seed", "mean", "gain kept", "compared"], rows)
    teacher = [row["val/teacher_bpb"] for row in results["same-tokenizer KD (reference)"]]
    own = [row["val/teacher_bpb"] for row in results["GOLD"]]
    print(f"teacher val/bpb: {statistics.mean(teacher):.4f} on its own blocks,")
    print(f"{statistics.mean(own):.4f} on the student's blocks read with its own tokenizer")


def step_cost(repeats: int) -> None:
    """Interleaved median step times of every variant against same-tokenizer KD, and the cross step's
    pieces."""
    data = {
        "teacher": TextDataModule(CORPUS, tokenizer=str(TEACHER), block_size=128, batch_size=16),
        "student": TextDataModule(CORPUS, tokenizer=STUDENT_TOKENIZER, block_size=128, batch_size=16),
    }
    batches = {}
    for name, module in data.items():
        module.setup("fit")
        loader = torch.utils.data.DataLoader(module.datasets["train"], batch_size=16)
        batches[name] = [batch for _, batch in zip(range(8), loader, strict=False)]
    specs: dict[str, tuple[str, DistillationLoss | None]] = {
        "same-tokenizer KD (reference)": ("teacher", ForwardKLLoss()),
        "student alone": ("student", None),
        "ULD": ("student", ULDLoss()),
        "GOLD": ("student", GOLDLoss()),
    }
    modules, variants = {}, {}
    for name, (side, loss) in specs.items():
        torch.manual_seed(0)
        module = build(data[side], loss)
        modules[name] = module
        variants[name] = train_step(module, batches[side])
    medians = interleaved_medians(variants, repeats, warmup=2)
    base = medians["same-tokenizer KD (reference)"]
    print(f"\none training step, batch 16 x 128, median of {repeats} interleaved rounds, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print_table(
        ["variant", "step s", "÷ same-tokenizer KD"],
        [[name, f"{seconds:.3f}", f"{seconds / base:.2f}"] for name, seconds in medians.items()],
    )
    pieces(modules["GOLD"], modules["ULD"], batches["student"], repeats)


def build(data: TextDataModule, loss: DistillationLoss | None) -> DistillationModule:
    """The recipe's student (and teacher, bound to the data's tokenizer as a run's set-up binds it)."""
    module = DistillationModule(
        student=STUDENT, teacher=None if loss is None else str(TEACHER), loss=loss, kd_ratio=0.5,
        vocab_size=data.vocab_size, block_size=data.block_size, eos_token_id=data.eos_token_id,
    )  # fmt: skip
    module.teacher_source = for_data(module.teacher_source, data.tokenizer)
    bind = getattr(module.teacher_source, "bind", None)
    if callable(bind):
        bind(data.tokenizer, module.loss)
    return module.train()


def train_step(module: DistillationModule, batches: list[dict]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=2e-3)
    order = cycle(batches)

    def run() -> None:
        module.compute_loss(next(order))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def pieces(gold: DistillationModule, uld: DistillationModule, batches: list[dict], repeats: int) -> None:
    """The cross step's own pieces: aligning a batch, and the loss alone (forward and backward) on one step's
    logits at the compared rows, against the forward KL on all the step's rows."""
    source: Any = gold.teacher_source
    batch = batches[0]
    aligner = source.aligner
    view = aligner(batch["input_ids"], batch["attention_mask"])
    compared = view.compared
    rows = int(view.predicting.sum())
    torch.manual_seed(0)
    student = torch.randn(compared, gold.vocab_size) * 2  # (M, V_s)
    teacher = torch.randn(compared, source.vocab_size) * 2  # (M, V_t)
    every = torch.randn(rows, gold.vocab_size) * 2  # (N, V_s): the same-tokenizer loss sees every row

    def loss_step(loss: DistillationLoss, s: torch.Tensor, t: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            logits = s.clone().requires_grad_(True)
            loss(logits, t).backward()

        return run

    medians = interleaved_medians(
        {
            "align a batch (CrossTokenizerAligner)": lambda: aligner(
                batch["input_ids"], batch["attention_mask"]
            ),
            "ForwardKL loss, N rows (autograd)": loss_step(ForwardKLLoss(), every, every.roll(1, 0)),
            "ULD loss, M compared rows": loss_step(uld.loss, student, teacher),
            "GOLD loss, M compared rows": loss_step(gold.loss, student, teacher),
        },
        repeats,
        warmup=1,
    )
    print(
        f"\npieces: N = {rows} predicting positions, M = {compared} compared, V_s = V_t = {gold.vocab_size}"
    )
    print_table(["piece", "median ms"], [[name, f"{1000 * s:.1f}"] for name, s in medians.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output_dir", default="runs/bench-cross-tokenizer")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--part", choices=["quality", "speed", "both"], default="both")
    parser.add_argument("--variants", nargs="+", choices=list(KEYS), help="run only these (no table)")
    parser.add_argument("--batch_size", type=int, help="the recipe's data.batch_size unless given")
    parser.add_argument("--block_size", type=int, help="the recipe's data.block_size unless given")
    args = parser.parse_args()
    for name in ("batch_size", "block_size"):
        if getattr(args, name) is not None:
            SIZE.extend([f"--data.init_args.{name}", str(getattr(args, name))])
    warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.part in ("quality", "both"):
        results = quality(output, args.steps, args.seeds, args.variants)
        if args.variants is None:
            (output / "quality.json").write_text(json.dumps(results, indent=1))
            print_quality(results, args.steps, args.seeds)
    if args.part in ("speed", "both"):
        step_cost(args.repeats)


if __name__ == "__main__":
    main()
