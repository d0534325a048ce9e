"""The quickstart distilled from a teacher behind a vLLM server, against the live teacher and a top-20 cache.

    VLLM_PY=$(bash .ci/vllm-env)
    python benchmarks/served_teacher.py --vllm_python "$VLLM_PY" --steps 100 --timing_steps 40 --rounds 2

It starts vLLM's CPU server on the shipped teacher (recipes/teacher: GPT-2 4x256, 4,096-token BPE), then
runs ``distilkit fit --config recipes/quickstart.yaml`` in a subprocess per setting, ``--steps`` steps each
with one validation at the end:

- ``live``: the teacher in the student's process (the recipe as shipped);
- ``served``: ``teacher: {server: URL, model: teacher, top_k: 20}`` (look-ahead 2 batches);
- ``cache``: from ``distilkit cache --mode topk --top_k 20`` of the live teacher (made first, timed).

It prints each run's validation perplexity, the student's training tokens per second (steps after the first
five, validation excluded) and the peak resident memory of the student's process (``ru_maxrss``). Then, in
``--rounds`` interleaved rounds of ``--timing_steps`` steps, the served run with look-ahead 2 and without
(``look_ahead: 0``): tokens per second and the share of the training time the step waited for the server.
Before the runs, the server alone scores quickstart batches (16 x 128) at K = 20: its tokens per second say
whether it can keep up with the student. Runs go under ``nice``; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from _common import print_table
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
TEACHER = ROOT / "recipes" / "teacher"
NAME, K = "teacher", 20


class StepClock(Callback):
    """Inside a benchmarked fit: the time at the end of every training batch, the validation windows, and (a
    served teacher) how long the steps waited for the server so far; written to ``output`` (JSON) at the end.

    Args:
        output: the JSON file to write.
    """

    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.ends: list[float] = []
        self.waited: list[float] = []
        self.validations: list[list[float]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.ends.append(time.perf_counter())
        source = getattr(pl_module, "teacher_source", None)
        waits = getattr(source, "waits", None)
        self.waited.append(waits["train"].seconds if waits else 0.0)
        self.tokens = int(batch["input_ids"].numel())

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.validations.append([time.perf_counter()])

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.validations[-1].append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        record = {"ends": self.ends, "waited": self.waited, "validations": self.validations}
        self.output.write_text(json.dumps({**record, "tokens_per_batch": self.tokens}))


def measured(clock: dict[str, Any], skip: int = 5) -> tuple[float, float]:
    """``(tokens/s, waited share)`` over the steps after the first ``skip``, validations left out."""
    ends, waited = clock["ends"], clock["waited"]
    start, stop = ends[skip - 1], ends[-1]
    windows = [window for window in clock["validations"] if len(window) == 2]
    validating = sum(max(0.0, min(b, stop) - max(a, start)) for a, b in windows)
    seconds = stop - start - validating
    steps = len(ends) - skip
    return steps * clock["tokens_per_batch"] / seconds, (waited[-1] - waited[skip - 1]) / seconds


def run_fit(work: Path, name: str, steps: int, *overrides: str) -> dict[str, Any]:
    """One ``distilkit fit`` of the quickstart in a subprocess: its clock, validation perplexity, peak RSS."""
    run_dir, clock_file = work / name, work / f"{name}.json"
    callbacks = [{"class_path": "served_teacher.StepClock", "init_args": {"output": str(clock_file)}}]
    command = [
        "nice", "-n", "10", sys.executable, "-m", "distilkit.cli", "fit", "--config", str(RECIPE),
        "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", json.dumps(callbacks), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    print("$", " ".join(command[3:]), flush=True)
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    errors = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if status != 0:
        sys.exit(f"{name} failed ({status}):\n{errors[-3000:]}")
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/ppl")]
    tokens_per_s, waited = measured(json.loads(clock_file.read_text()))
    return {
        "ppl": float(rows[-1]["val/ppl"]),
        "teacher_ppl": float(rows[-1]["val/teacher_ppl"]) if rows[-1].get("val/teacher_ppl") else None,
        "tokens_per_s": tokens_per_s,
        "waited": waited,
        "peak_mib": usage.ru_maxrss / 1024,  # KiB on Linux
    }


def server_alone(url: str, batches: int) -> float:
    """Tokens per second the server scores quickstart batches (16 x 128) at K = 20, alone (look-ahead off)."""
    from distilkit.data import TextDataModule
    from distilkit.teachers.server import ServedTeacher

    data = TextDataModule("builtin:python-reference", tokenizer=str(TEACHER), block_size=128, batch_size=16)
    data.setup("fit")
    blocks = [data.datasets["train"][i]["input_ids"] for i in range(16 * batches)]
    with ServedTeacher(url, NAME, top_k=K, max_in_flight=8) as teacher:
        teacher.check(data.tokenizer, block_size=128)
        teacher.score(blocks[:16])  # warm
        start = time.perf_counter()
        pending = [
            teacher.submit(blocks[i : i + 16], wait_for_slots=False) for i in range(0, len(blocks), 16)
        ]
        for batch in pending:
            batch.result()
        return 128 * len(blocks) / (time.perf_counter() - start)


def measure(
    args: argparse.Namespace, work: Path, url: str
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], float]:
    """The server alone, the cache, the three perplexity runs and the interleaved look-ahead rounds."""
    alone = server_alone(url, args.alone_batches)
    print(f"server alone: {alone:,.0f} tokens/s at K = {K}", flush=True)
    served = json.dumps({"server": url, "model": NAME, "top_k": K})
    no_look_ahead = json.dumps({"server": url, "model": NAME, "top_k": K, "look_ahead": 0})
    cache_dir = work / "cache-top20"
    started = time.perf_counter()
    subprocess.run(
        ["nice", "-n", "10", sys.executable, "-m", "distilkit.cli", "cache", "--config", str(RECIPE),
         "--output_dir", str(cache_dir), "--mode", "topk", "--top_k", str(K),
         "--trainer.enable_progress_bar", "false"],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    print(f"top-{K} cache made in {time.perf_counter() - started:.0f} s", flush=True)
    cache = ("--model.init_args.teacher", "null", "--model.init_args.teacher_cache", str(cache_dir))
    results = {}
    for name, overrides in (
        ("live", ()),
        ("served", ("--model.init_args.teacher", served)),
        ("cache", cache),
    ):
        results[name] = run_fit(work, name, args.steps, *overrides)
        print(name, results[name], flush=True)
    timing: dict[str, list[dict[str, Any]]] = {"look-ahead 2": [], "no look-ahead": []}
    # The timing runs' validation is not measured: keep it short.
    brief = ("--trainer.limit_val_batches", "2", "--model.init_args.teacher")
    for round_ in range(args.rounds):
        for name, spec in (("look-ahead 2", served), ("no look-ahead", no_look_ahead)):
            key = f"t{round_}-{name.replace(' ', '-')}"
            timing[name].append(run_fit(work, key, args.timing_steps, *brief, spec))
            print(key, timing[name][-1], flush=True)
    return results, timing, alone


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm_python", default=None, help="the vLLM environment's python (.ci/vllm-env)")
    parser.add_argument("--steps", type=int, default=100, help="steps of the perplexity runs")
    parser.add_argument("--timing_steps", type=int, default=40, help="steps of each look-ahead timing round")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds with and without look-ahead"
    )
    parser.add_argument("--alone_batches", type=int, default=8, help="batches the server scores alone")
    parser.add_argument("--work", type=Path, default=None, help="where runs go (default: a temp folder)")
    parser.add_argument("--url", default=None, help="a running server of recipes/teacher named 'teacher'")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="served-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.url:  # a server already running (started as README shows)
        results, timing, alone = measure(args, work, args.url)
    else:
        from distilkit.teachers.vllm_launcher import VLLMServer, vllm_python

        python = args.vllm_python or vllm_python()
        if python is None:
            sys.exit("no vLLM environment: run `bash .ci/vllm-env` and pass --vllm_python")
        log = work / "vllm.log"
        # GPT-2 has 128 positions: the block of 128 and the one sampled token (never fed back) need 129.
        server = VLLMServer(
            TEACHER, python=python, served_model_name=NAME, max_model_len=129, log_path=log,
            env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
        )  # fmt: skip
        print("server:", " ".join(server.command()), f"(log {server.log_path})", flush=True)
        with server:
            print(
                f"ready in {server.ready_seconds:.0f} s, {server.memory_bytes() / 2**30:.2f} GiB", flush=True
            )
            results, timing, alone = measure(args, work, server.url)

    rows = [
        [
            name,
            f"{r['ppl']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['waited']:.1%}" if name == "served" else "",
            f"{r['peak_mib']:,.0f}",
        ]
        for name, r in results.items()
    ]
    print(f"\nquickstart, {args.steps} steps, teacher val ppl {results['live']['teacher_ppl']:.2f}")
    print_table(["teacher", "val ppl", "train tokens/s", "step waits on server", "peak RSS (MiB)"], rows)
    rows = []
    for name, runs in timing.items():
        speeds = sorted(r["tokens_per_s"] for r in runs)
        waits = sorted(r["waited"] for r in runs)
        rows.append([name, f"{speeds[len(speeds) // 2]:,.0f}", f"{waits[len(waits) // 2]:.1%}", len(runs)])
    print(f"\nserved, {args.timing_steps} steps a round; server alone {alone:,.0f} tokens/s")
    print_table(["served run", "train tokens/s (median)", "step waits on server (median)", "rounds"], rows)
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
