"""A real teacher on conversations: SmolLM2-135M-Instruct against students cut from it, before and after
training on its answers, with CE alone (SFT) and with KD, at equal steps on the same data.

Everything is ``recipes/smollm2.yaml`` (run ``make smollm2`` first): the teacher's answers to the shipped
training prompts, the student cut from the teacher at a third of its parameters, 4 x 256 tokens a step. The
runs differ only in ``kd_ratio`` (0: supervised fine-tuning on the answers, CE only; the recipe's 0.5: CE
and KD), in the KD divergence (``--kd_losses``: the recipe's, or several side by side) and, for memory, in
``teacher_dtype``. ``--seed`` seeds every fit (``seed_everything`` and the data's ``seed``: the order of the
training blocks, so also the cut's calibration batches; the student is cut, not drawn, and has no dropout,
so ``seed_everything`` alone changes nothing). On the first ``--heldout`` held-out prompts
(``recipes/smollm2/heldout_prompts.jsonl``, never trained on) each model is scored on:

* answer NLL: mean NLL per token of the teacher's own answers (assistant tokens only, end-of-turn token
  included when the answer ended);
* teacher NLL of own answers: the model answers each prompt (temperature 0.7, top-p 0.9, at most
  ``--max_new_tokens``), and the teacher scores those answers per token; the students answer once per seed
  of ``--sample_seeds`` (the mean, and each seed's), the teacher with the first seed;
* distinct-2: distinct token bigrams over all bigrams of those answers (a repetitive model shows; the
  mean over the seeds);
* parameters, and sampling speed (answer tokens per second, batch 8, on this machine; the median over the
  seeds);
* peak memory (max RSS) of the KD fit with the teacher in float32 and in bfloat16 (each fit is a child
  process; the SFT fit loads the teacher too, for ``val/teacher_ppl``); ``--no_bfloat16_fit`` skips the
  bfloat16 one.

The teacher's answers are made with ``distilkit generate --chat`` (the recipe's settings) unless given
(``--train_answers``, ``--heldout_answers``). A small run: ``python benchmarks/real_teacher.py --steps 2
--batch_size 1 --train_prompts 16 --heldout 8 --max_new_tokens 32``; the recipe's: the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import ROOT, print_table
from torch import nn
from transformers import AutoModelForCausalLM

from distilkit import losses
from distilkit.commands.generate import generate
from distilkit.data.chat import encode_conversation
from distilkit.models.loading import load_causal_lm, tokenizer_of
from distilkit.models.replies import Reply, generate_replies

TEACHER = "recipes/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLING = {"temperature": 0.7, "top_p": 0.9}


def child(*args: str) -> tuple[float, float]:
    """Run ``distilkit ARGS`` in a child process: its wall seconds and peak RSS in MiB."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "distilkit.cli", *args])
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"distilkit {' '.join(args[:3])} ... failed ({process.returncode})")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def answers(path: str | None, prompts: str, count: int, out: Path, max_new_tokens: int) -> Path:
    """The teacher's answers to the first ``count`` prompts of ``prompts`` (``path`` when given)."""
    if path is not None:
        return Path(path)
    subset = out.with_suffix(".prompts.jsonl")
    subset.write_text("".join((ROOT / prompts).read_text().splitlines(keepends=True)[:count]))
    options = {"max_new_tokens": max_new_tokens, "batch_size": 16, **SAMPLING}
    return generate(TEACHER, str(out), prompts=str(subset), chat=True, overwrite=True, **options)


def recipe_for(work: Path, train: Path, heldout: Path, steps: int, batch_size: int, seed: int) -> Path:
    """``recipes/smollm2.yaml`` on these answers, ``steps`` of ``batch_size`` blocks long, validated once at
    the end on one batch."""
    config = yaml.safe_load((ROOT / "recipes" / "smollm2.yaml").read_text())
    config["seed_everything"] = seed
    config["data"]["init_args"]["seed"] = seed
    config["data"]["init_args"] |= {"train_files": str(train), "val_files": str(heldout)}
    config["data"]["init_args"]["batch_size"] = batch_size
    config["trainer"] |= {
        "max_steps": steps,
        "val_check_interval": steps,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def answer_nll(model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], finished: list[bool]) -> float:
    """Mean NLL per assistant token of ``rows`` (conversations) under ``model``."""
    total, count = 0.0, 0
    for index, (row, done) in enumerate(zip(rows, finished, strict=True)):
        ids, mask = encode_conversation(
            tokenizer, tokenizer.chat_template, row["messages"], "heldout", f"row {index}", done
        )
        tokens = torch.tensor([ids])  # (1, T)
        target = torch.tensor(mask[1:], dtype=torch.bool)  # (T-1,): the next token is the assistant's
        with torch.no_grad():
            logits = model(tokens).logits[0, :-1].float()  # (T-1, V)
        nll = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")  # (T-1,)
        total += float(nll[target].sum())
        count += int(target.sum())
    return total / count


def sample_answers(
    model: nn.Module, tokenizer: Any, prompts: list[list[dict[str, Any]]], max_new_tokens: int, seed: int
) -> tuple[list[Reply], float]:
    """The model's answers to ``prompts`` (seeded, batches of 8) and answer tokens per second."""
    replies: list[Reply] = []
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    for first in range(0, len(prompts), 8):
        replies += generate_replies(
            model, tokenizer, prompts[first : first + 8], template=tokenizer.chat_template,
            max_new_tokens=max_new_tokens, generator=generator, **SAMPLING,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    return replies, sum(len(r.tokens) for r in replies) / seconds


def distinct2(replies: list[Reply]) -> float:
    """Distinct token bigrams over all bigrams of the replies (none spanning two replies)."""
    bigrams = [pair for r in replies for pair in zip(r.tokens, r.tokens[1:], strict=False)]
    return len(set(bigrams)) / max(len(bigrams), 1)


def is_divergence(kind: Any) -> bool:
    """Whether ``kind`` is a divergence the recipe's same-tokenizer KD can take: a loss of
    :mod:`distilkit.losses` with its own ``divergence`` (not the base class), and not one of the
    cross-tokenizer losses, which need a teacher tokenizer."""
    base = losses.DistillationLoss
    if not (isinstance(kind, type) and issubclass(kind, base)) or kind.divergence is base.divergence:
        return False
    return not issubclass(kind, (losses.GOLDLoss, losses.ULDLoss))


def fits(recipe: Path, args: argparse.Namespace) -> list[tuple[str, list[str], str]]:
    """The fits to run, each ``(name, overrides, teacher dtype)``: SFT, KD with each of ``--kd_losses``
    (the recipe's divergence by default), then the first KD again with the teacher in bfloat16."""
    loss = yaml.safe_load(recipe.read_text())["model"]["init_args"]["loss"]["class_path"]
    names = args.kd_losses or [loss.rsplit(".", 1)[-1]]
    steps = f"{args.steps} steps"
    runs = [(f"SFT (CE only), {steps}", ["--model.init_args.kd_ratio", "0"], "float32")]
    for name in names:
        option = json.dumps({"class_path": f"distilkit.losses.{name}"})
        runs.append((f"KD (CE + {name}), {steps}", ["--model.init_args.loss", option], "float32"))
    if not args.no_bfloat16_fit:
        runs.append((f"KD (CE + {names[0]}), {steps}, teacher in bfloat16", runs[1][1], "bfloat16"))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps of each fit (the recipe's 50)")
    parser.add_argument(
        "--batch_size", type=int, default=4, help="blocks of 256 tokens a step (the recipe's 4)"
    )
    parser.add_argument("--train_prompts", type=int, default=300, help="training prompts answered")
    parser.add_argument("--heldout", type=int, default=60, help="held-out prompts scored")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="answer length cap (the recipe's 96)")
    parser.add_argument("--train_answers", help="the teacher's answers to train on (default: generated)")
    parser.add_argument("--heldout_answers", help="its answers to the held-out prompts (default: generated)")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--show", type=int, default=2, help="answers printed side by side")
    parser.add_argument(
        "--sample_seeds", type=int, nargs="+", default=[0], help="sampling seeds of the students' answers"
    )
    parser.add_argument(
        "--kd_losses", nargs="+", metavar="LOSS",
        help="KD divergences, one fit each: class names of distilkit.losses (default: the recipe's)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="seed_everything and data seed of every fit (the recipe's 0)"
    )
    parser.add_argument(
        "--no_bfloat16_fit", action="store_true", help="skip the last fit (the teacher in bfloat16: memory)"
    )
    args = parser.parse_args()
    unknown = [name for name in args.kd_losses or [] if not is_divergence(getattr(losses, name, None))]
    if unknown:
        parser.error(
            f"--kd_losses {' '.join(unknown)}: not a divergence of distilkit.losses (e.g. ForwardKLLoss)"
        )
    if args.kd_losses and len(set(args.kd_losses)) < len(args.kd_losses):
        parser.error(f"--kd_losses {' '.join(args.kd_losses)}: a loss named twice")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train = answers(
            args.train_answers, "recipes/smollm2/prompts.jsonl", args.train_prompts, work / "answers.jsonl",
            args.max_new_tokens,
        )  # fmt: skip
        heldout = answers(
            args.heldout_answers, "recipes/smollm2/heldout_prompts.jsonl", args.heldout,
            work / "heldout_answers.jsonl", args.max_new_tokens,
        )  # fmt: skip
        recipe = recipe_for(work, train, heldout, args.steps, args.batch_size, args.seed)
        child("prune", "--config", str(recipe), "--output_dir", str(work / "cut"), "--overwrite", "true")
        memory: list[list[object]] = []
        models = {"cut, untrained": work / "cut"}
        for index, (name, options, dtype) in enumerate(fits(recipe, args)):
            run = work / f"run{index}"
            seconds, peak = child(
                "fit", "--config", str(recipe), "--trainer.default_root_dir", str(run), *options,
                "--model.init_args.teacher_dtype", dtype,
            )  # fmt: skip
            memory.append([name, dtype, f"{peak:,.0f}", f"{seconds:.0f}"])
            if dtype == "float32":
                child("export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                      "--output_dir", str(work / f"model{index}"), "--overwrite", "true")  # fmt: skip
                models[name] = work / f"model{index}"
        score(models, heldout, args)
        print()
        print_table(["fit", "teacher dtype", "peak RSS MiB", "wall s (load, cut, steps, validation)"], memory)


def score(models: dict[str, Path], heldout: Path, args: argparse.Namespace) -> None:
    """Print the table of the held-out measures and a few answers side by side."""
    tokenizer = tokenizer_of(TEACHER, "teacher")
    teacher = load_causal_lm(TEACHER, field="teacher").eval()
    rows = [json.loads(line) for line in heldout.read_text().splitlines()[: args.heldout]]
    finished = [row.get("finish_reason") != "length" for row in rows]
    prompts = [row["messages"][:-1] for row in rows]
    table, said = [], {}
    for name, model in [("teacher (SmolLM2-135M-Instruct)", teacher), *models.items()]:
        lm = model if isinstance(model, nn.Module) else AutoModelForCausalLM.from_pretrained(model).eval()
        seeds = args.sample_seeds[:1] if lm is teacher else args.sample_seeds
        judged, distinct, speeds = [], [], []
        for seed in seeds:
            replies, speed = sample_answers(lm, tokenizer, prompts, args.max_new_tokens, seed)
            own = [
                {"messages": [*p, {"role": "assistant", "content": r.text}]}
                for p, r in zip(prompts, replies, strict=True)
            ]
            judged.append(answer_nll(teacher, tokenizer, own, [r.finished for r in replies]))
            distinct.append(distinct2(replies))
            speeds.append(speed)
            said.setdefault(name, replies)
        nll = answer_nll(lm, tokenizer, rows, finished)
        params = sum(p.numel() for p in lm.parameters())
        each = f" ({' / '.join(f'{value:.3f}' for value in judged)})" if len(judged) > 1 else ""
        table.append([name, f"{params / 1e6:.1f}", f"{nll:.3f} (ppl {math.exp(nll):.1f})",
                      f"{statistics.mean(judged):.3f}{each}", f"{statistics.mean(distinct):.3f}",
                      f"{statistics.median(speeds):.1f}"])  # fmt: skip
        print(f"scored {name}", flush=True)
    print()
    print_table(
        ["model", "params M", "NLL/token of teacher's answers", "teacher NLL/token of own answers",
         "distinct-2", "sampled tokens/s"], table,
    )  # fmt: skip
    for index in range(min(args.show, len(prompts))):
        print(f"\n**{prompts[index][-1]['content']}**\n")
        for name, replies in said.items():
            print(f"- {name}: {replies[index].text[:300]!r}")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
