"""distilkit against the floor and TRL in one run: tokens/s, extra step memory, first step, step-0 loss.

Variants, each trained for ``--steps`` steps in its own process, in turn (A, B, C, ..., A, B, C, ...) for
``--repeats`` rounds; all start from the same teacher and student weights and see the same batches in the same
order, with the same AdamW (lr 1e-3, no weight decay, no clipping):

- floor: the teacher's forward pass (logits included) and the student's forward/backward/step with
  transformers' own cross-entropy (``labels=``), in a bare loop: the least a distillation step can cost;
- distilkit: ``DistillationModule`` under Lightning, forward KL mixed half and half with CE: the defaults;
  ``compile_loss: true``; ``chunk_size: null`` (the unchunked reference path);
- TRL: ``GKDTrainer`` with ``lmbda=0`` (no on-policy samples) and ``beta=0`` (the forward KL, TRL's
  convention), when TRL is installed (``pip install -e ".[bench]"``); its loss is the KD term alone.

Step time is the median over the steps after the first of every round; tokens/s counts every input token
(batch × sequence). Extra step memory is the peak resident set during a step beyond the resident set at its
start (models, optimizer state and inputs), the largest over those steps (Linux ``/proc``); on CUDA, the peak
of allocated memory beyond that at the start. The first step includes any compilation: the compiled variant
runs with an empty Inductor cache in the first round and a warm one after. Step-0 loss: the relative error of
the KD term (CE for the floor) against the same quantity in float64 (forward KL averaged over the B·(T−1)
predicted positions). On CUDA the runs use bf16 autocast (Lightning's ``bf16-mixed``, TRL's ``bf16``).

Run: ``python benchmarks/peers.py [--sizes large quickstart] [--steps 6] [--repeats 2]`` (CPU: about
half an hour on 2 loaded cores; a GPU is used when present, ``--device cpu`` to refuse it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import print_table

LR = 1e-3
#: V = 32,768 with 4 × 512 tokens; the quickstart's sizes (V = 4,096, 16 × 128 tokens); a smoke test. Teacher
#: GPT-2 4×256, student 2×128 (the quickstart's models), random weights, no dropout.
SIZES = {
    "large": {"vocab": 32768, "batch": 4, "seq": 512},
    "quickstart": {"vocab": 4096, "batch": 16, "seq": 128},
    "tiny": {"vocab": 512, "batch": 2, "seq": 32},
}
TEACHER = {"n_layer": 4, "n_embd": 256, "n_head": 4}
STUDENT = {"n_layer": 2, "n_embd": 128, "n_head": 4}
VARIANTS = {
    "floor": "floor: teacher forward + student step with HF CE",
    "default": "distilkit default",
    "compiled": "distilkit `compile_loss: true`",
    "unchunked": "distilkit `chunk_size: null`",
    "trl": "TRL `GKDTrainer` (lmbda=0, beta=0)",
}


# ----------------------------------------------------------------------------------------------- set-up
def gpt2(size: dict[str, int], layout: dict[str, int]) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=size["vocab"], n_positions=size["seq"], bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **layout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def prepare(size_name: str, steps: int, folder: Path) -> Path:
    """Teacher and student start weights and the batches, seeded, saved for every variant's process."""
    size = SIZES[size_name]
    torch.manual_seed(0)
    teacher, student = gpt2(size, TEACHER), gpt2(size, STUDENT)
    ids = torch.randint(1, size["vocab"], (steps, size["batch"], size["seq"]))  # (steps, B, T)
    path = folder / f"{size_name}.pt"
    weights = {"teacher": teacher.state_dict(), "student": student.state_dict()}
    torch.save({"size": size_name, "ids": ids, **weights}, path)
    return path


Setup = tuple[dict[str, int], torch.nn.Module, torch.nn.Module, torch.Tensor]


def load(path: Path, device: torch.device) -> Setup:
    """Size, teacher (eval mode), student (train mode) and batches ``(steps, B, T)`` from :func:`prepare`."""
    setup = torch.load(path, weights_only=True)
    size = SIZES[setup["size"]]
    teacher, student = gpt2(size, TEACHER), gpt2(size, STUDENT)
    teacher.load_state_dict(setup["teacher"])
    student.load_state_dict(setup["student"])
    return size, teacher.to(device).eval(), student.to(device).train(), setup["ids"]


def float64_reference(path: Path) -> dict[str, float]:
    """Forward KL (teacher ‖ student) and the student's CE on batch 0, in float64, averaged over B·(T−1)."""
    _, teacher, student, ids = load(path, torch.device("cpu"))
    teacher, student = teacher.double(), student.double().eval()
    kd = ce = 0.0
    with torch.no_grad():
        for row in ids[0]:  # one sequence at a time: (T, V) float64 logits
            s = student(input_ids=row[None]).logits[0, :-1]  # (T-1, V)
            t = teacher(input_ids=row[None]).logits[0, :-1]  # (T-1, V)
            log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
            kd += float((log_p.exp() * (log_p - log_q)).sum())
            ce += float(-log_q.gather(1, row[1:, None]).sum())
    count = ids.shape[1] * (ids.shape[2] - 1)
    return {"kd": kd / count, "ce": ce / count}


# ------------------------------------------------------------------------------------------- measuring
class StepMeter:
    """Seconds and extra peak memory (MiB) of each step: :meth:`start` before it, :meth:`stop` after."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.extra_mib = device, [], []  # type: ignore[var-annotated]

    @staticmethod
    def _kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
            self._base = self._kib("VmRSS") / 1024
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = self._kib("VmHWM") / 1024
        self.seconds.append(time.perf_counter() - self._t0)
        self.extra_mib.append(peak - self._base)


def run_floor(path: Path, device: torch.device, meter: StepMeter) -> float:
    _, teacher, student, ids = load(path, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    first = 0.0
    for step, batch in enumerate(ids.to(device)):
        meter.start()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                teacher(input_ids=batch).logits  # noqa: B018  the teacher's logits, as a KD step needs them
            loss = student(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.stop()
        first = float(loss) if step == 0 else first
    return first


def run_distilkit(path: Path, device: torch.device, meter: StepMeter, variant: str) -> float:
    import lightning as L

    from distilkit import DistillationModule

    size, teacher, student, ids = load(path, device)
    options = {"compiled": {"compile_loss": True}, "unchunked": {"chunk_size": None}}.get(variant, {})
    module = DistillationModule(
        student=student, teacher=teacher, vocab_size=size["vocab"], block_size=size["seq"], eos_token_id=0,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0), **options,
    )  # fmt: skip
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in ids]
    kd0: list[float] = []

    class Meter(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            meter.start()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            meter.stop()
            if not kd0:
                kd0.append(float(trainer.callback_metrics["train/kd_loss"]))

    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Meter()],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return kd0[0]


def run_trl(path: Path, device: torch.device, meter: StepMeter) -> float:
    import datasets
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    _, teacher, student, ids = load(path, device)
    vocab = Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))  # GKD asks for a pad id only
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>")
    rows = datasets.IterableDataset.from_generator(
        lambda: ({"input_ids": r.tolist()} for r in ids.flatten(0, 1))
    )

    def collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = torch.tensor([e["input_ids"] for e in examples])  # (B, T)
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch.clone()}

    class Meter(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.stop()

    losses: list[float] = []

    class Recorded(GKDTrainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, return_outputs, **kwargs)
            if not losses:
                losses.append(float(loss[0] if isinstance(loss, tuple) else loss))
            return loss

    args = GKDConfig(
        output_dir=tempfile.mkdtemp(), max_steps=ids.shape[0], per_device_train_batch_size=ids.shape[1],
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        optim="adamw_torch", lmbda=0.0, beta=0.0, temperature=1.0, max_length=ids.shape[2], seed=0,
        logging_steps=10_000, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=device.type == "cpu", bf16=device.type == "cuda",
    )  # fmt: skip
    trainer = Recorded(
        model=student, teacher_model=teacher, args=args, train_dataset=rows, data_collator=collate,
        processing_class=tokenizer, callbacks=[Meter()],
    )  # fmt: skip
    trainer.train()
    return losses[0]


def run_one(variant: str, path: Path, device_name: str) -> dict[str, Any]:
    """One variant's run in this process."""
    device = torch.device(device_name)
    meter = StepMeter(device)
    runners: dict[str, Callable[[], float]] = {
        "floor": lambda: run_floor(path, device, meter),
        "trl": lambda: run_trl(path, device, meter),
    }
    loss0 = runners.get(variant, lambda: run_distilkit(path, device, meter, variant))()
    return {"seconds": meter.seconds, "extra_mib": meter.extra_mib, "loss0": loss0}


# -------------------------------------------------------------------------------------------- reporting
def trl_version() -> str | None:
    try:
        import trl

        return str(trl.__version__)
    except ImportError:
        return None


def spawn(variant: str, path: Path, device: str, cache: Path) -> dict[str, Any]:
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run(
        [sys.executable, __file__, "--one", variant, str(path), device],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(size_name: str, runs: dict[str, list[dict[str, Any]]], reference: dict[str, float]) -> None:
    size = SIZES[size_name]
    tokens = size["batch"] * size["seq"]
    step = {v: statistics.median(s for r in rs for s in r["seconds"][1:]) for v, rs in runs.items()}
    memory = {v: max(m for r in rs for m in r["extra_mib"][1:]) for v, rs in runs.items()}
    rows = []
    for variant, rs in runs.items():
        wanted = reference["ce"] if variant == "floor" else reference["kd"]
        error = abs(rs[0]["loss0"] - wanted) / wanted
        vs_trl = "trl" in runs and variant != "trl"
        rows.append([
            VARIANTS[variant],
            f"{tokens / step[variant]:,.0f}",
            f"{step['floor'] / step[variant]:.2f} (step {step[variant] / step['floor']:.2f}×)",
            f"{step['trl'] / step[variant]:.2f}×" if vs_trl else "",
            f"{memory[variant]:.0f}",
            f"{memory[variant] / memory['trl']:.2f}×" if vs_trl and memory["trl"] > 0 else "",
            " / ".join(f"{r['seconds'][0]:.1f}" for r in rs),
            f"{error:.1e}",
        ])  # fmt: skip
    print(f"\nV = {size['vocab']:,}, {size['batch']} × {size['seq']} tokens")
    headers = ["variant", "tokens/s", "vs floor", "vs TRL GKD", "extra step MiB", "vs TRL", "first step s"]
    print_table([*headers, "step-0 loss error"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "SETUP", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=["large", "quickstart"], choices=list(SIZES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), args.one[2])))
        return
    variants = [v for v in args.variants if v != "trl" or trl_version()]
    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"TRL {trl_version() or 'not installed (pip install -e .[bench])'}, load {os.getloadavg()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp), Path(tmp) / "inductor"  # an empty compile cache: the first run pays
        for size_name in args.sizes:
            path = prepare(size_name, args.steps, folder)
            reference = float64_reference(path)
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for _ in range(args.repeats):
                for variant in variants:
                    runs[variant].append(spawn(variant, path, args.device, cache))
            report(size_name, runs, reference)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
