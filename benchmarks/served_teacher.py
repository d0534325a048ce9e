"""The quickstart distilled from a teacher behind a vLLM server, against the live teacher and a top-20 cache.

    VLLM_PY=$(bash .ci/vllm-env)
    python benchmarks/served_teacher.py --vllm_python "$VLLM_PY" --steps 100 --timing_steps 40 --rounds 2
    python benchmarks/served_teacher.py --teacher smollm2 --steps 40 --timing_steps 20 --rounds 2

``--teacher quickstart`` (the default) serves the shipped teacher (recipes/teacher: GPT-2 4x256, 4,096-token
BPE); ``--teacher smollm2`` serves SmolLM2-135M-Instruct (``make smollm2``; vLLM serves the Hugging Face copy
distilkit converts the GGUF file into) and changes the quickstart recipe to fit it: the data tokenized with
its tokenizer, the first ``--corpus_chars`` characters of the built-in corpus (whole documents: the cache
scores every block: about 50-100 tokens/s on 2 busy CPU cores), batches of ``--batch_size`` (default 4), and a
student of its vocabulary (Llama, 2 layers x 128). It starts vLLM's CPU server on that teacher, then runs
``distilkit fit --config recipes/quickstart.yaml`` in a subprocess per setting, ``--steps`` steps each with
one validation at the end:

- ``live``: the teacher in the student's process;
- ``served``: ``teacher: {server: URL, model: NAME, top_k: 20}`` (look-ahead 2 batches);
- ``cache``: from ``distilkit cache --mode topk --top_k 20`` of the live teacher (made first, timed).

It prints each run's validation perplexity, the student's training tokens per second (steps after the first
five, validation excluded) and the peak resident memory of the student's process (``ru_maxrss``). Then, in
``--rounds`` interleaved rounds of ``--timing_steps`` steps, the served run with look-ahead 2 and without
(``look_ahead: 0``): tokens per second and the share of the training time the step waited for the server.
Before the runs, the server alone scores batches of the run (B x 128) at K = 20: its tokens per second say
whether it can keep up with the student. Runs go under ``nice``; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from _common import ROOT, print_table
from lightning.pytorch.callbacks import Callback

RECIPE = ROOT / "recipes" / "quickstart.yaml"
CORPUS = "builtin:python-reference"
SMOLLM2 = ROOT / "recipes" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK, K = 128, 20
#: The SmolLM2 run's student: a 2 x 128 Llama (head size 64, as the teacher's) of the teacher's vocabulary
#: (``vocab_size`` comes from the tokenizer), its output head tied to the embedding.
SMOLLM2_STUDENT = {
    "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 512,
    "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True,
}  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """One benchmarked teacher: the directory vLLM serves and what every run changes in the quickstart recipe.

    Args:
        title: the tables' caption.
        served: the Hugging Face directory the server serves.
        name: its served model name.
        teacher: ``model.teacher`` of the live run and of the cache.
        tokenizer: ``data.tokenizer`` (the teacher's).
        train_files: ``data.train_files``.
        batch_size: ``data.batch_size``.
        student: ``model.student`` (None: the recipe's).
        server_env: further environment variables for the server.
    """

    title: str
    served: Path
    name: str
    teacher: str
    tokenizer: str
    train_files: str
    batch_size: int
    student: dict[str, Any] | None = None
    server_env: dict[str, str] = field(default_factory=dict)

    def overrides(self) -> tuple[str, ...]:
        """The recipe's fields as this setup sets them: ``distilkit fit`` and ``cache`` arguments."""
        fields = {
            "--model.init_args.teacher": self.teacher,
            "--data.init_args.tokenizer": self.tokenizer,
            "--data.init_args.train_files": self.train_files,
            "--data.init_args.batch_size": str(self.batch_size),
        }
        if self.student is not None:
            fields["--model.init_args.student"] = json.dumps(self.student)
        return tuple(arg for item in fields.items() for arg in item)

    def served_spec(self, url: str, **settings: Any) -> str:
        """``model.teacher`` for this setup's server at ``url``, with further settings (``look_ahead``)."""
        return json.dumps({"server": url, "model": self.name, "top_k": K, **settings})


def quickstart_setup() -> Setup:
    """The quickstart as shipped: the GPT-2 teacher, the whole built-in corpus, batches of 16."""
    teacher = str(ROOT / "recipes" / "teacher")
    # GPT-2 has 128 positions: the block of 128 and the one sampled token (never fed back) need 129.
    long_context = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    return Setup(
        title="quickstart (GPT-2 4x256 teacher)",
        served=Path(teacher),
        name="teacher",
        teacher=teacher,
        tokenizer=teacher,
        train_files=CORPUS,
        batch_size=16,
        server_env=long_context,
    )


def smollm2_setup(work: Path, corpus_chars: int, batch_size: int) -> Setup:
    """SmolLM2-135M-Instruct from its GGUF file, on a prefix of the built-in corpus, with a Llama student."""
    from distilkit.models.gguf import converted_gguf_directory

    if not SMOLLM2.is_file():
        sys.exit(f"{SMOLLM2.relative_to(ROOT)} is missing: run `make smollm2`")
    served = converted_gguf_directory(SMOLLM2, field="teacher")  # the converted copy (cached)
    corpus = corpus_prefix(work / "corpus.jsonl", corpus_chars)
    return Setup(
        title="SmolLM2-135M-Instruct teacher",
        served=served,
        name="smollm2",
        teacher=str(SMOLLM2),
        tokenizer=str(SMOLLM2),
        train_files=str(corpus),
        batch_size=batch_size,
        student=SMOLLM2_STUDENT,
    )


def corpus_prefix(path: Path, chars: int) -> Path:
    """Write the built-in corpus's first documents, until ``chars`` characters of text, to ``path``."""
    from distilkit.data.corpus import builtin_documents

    taken, kept = 0, []
    for document in builtin_documents(CORPUS.removeprefix("builtin:")):
        if taken >= chars:
            break
        kept.append(json.dumps(document) + "\n")
        taken += len(document["text"])
    path.write_text("".join(kept))
    return path


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


def run_fit(setup: Setup, work: Path, name: str, steps: int, *overrides: str) -> dict[str, Any]:
    """One ``distilkit fit`` of the quickstart as ``setup`` changes it, then ``overrides``, in a subprocess:
    its clock, validation perplexity, peak RSS."""
    run_dir, clock_file = work / name, work / f"{name}.json"
    callbacks = [{"class_path": "served_teacher.StepClock", "init_args": {"output": str(clock_file)}}]
    command = [
        "nice", "-n", "10", sys.executable, "-m", "distilkit.cli", "fit", "--config", str(RECIPE),
        "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", json.dumps(callbacks), *setup.overrides(), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    print("$", shlex.join(command[3:]), flush=True)
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


def server_alone(setup: Setup, url: str, batches: int) -> float:
    """Tokens per second the server scores the run's batches (B x 128) at K = 20, alone (look-ahead off)."""
    from distilkit.data import TextDataModule
    from distilkit.teachers.server import ServedTeacher

    size = setup.batch_size
    data = TextDataModule(setup.train_files, tokenizer=setup.tokenizer, block_size=BLOCK, batch_size=size)
    data.setup("fit")
    blocks = [data.datasets["train"][i]["input_ids"].tolist() for i in range(size * (batches + 1))]
    with ServedTeacher(url, setup.name, top_k=K, max_in_flight=8) as teacher:
        teacher.check(data.tokenizer, block_size=BLOCK)
        teacher.score(blocks[:size])  # warm
        start = time.perf_counter()
        pending = [
            teacher.submit(blocks[i : i + size], wait_for_slots=False) for i in range(size, len(blocks), size)
        ]
        for batch in pending:
            batch.result()
        return BLOCK * size * batches / (time.perf_counter() - start)


def measure(
    setup: Setup, args: argparse.Namespace, work: Path, url: str
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], float]:
    """The server alone, the cache, the three perplexity runs and the interleaved look-ahead rounds."""
    alone = server_alone(setup, url, args.alone_batches)
    print(f"server alone: {alone:,.0f} tokens/s at K = {K}", flush=True)
    served, no_look_ahead = setup.served_spec(url), setup.served_spec(url, look_ahead=0)
    cache_dir = work / "cache-top20"
    started = time.perf_counter()
    command = [
        "nice", "-n", "10", sys.executable, "-m", "distilkit.cli", "cache", "--config", str(RECIPE),
        "--output_dir", str(cache_dir), "--mode", "topk", "--top_k", str(K),
        "--trainer.enable_progress_bar", "false", *setup.overrides(),
    ]  # fmt: skip
    print("$", shlex.join(command[3:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"top-{K} cache made in {time.perf_counter() - started:.0f} s", flush=True)
    cache = ("--model.init_args.teacher", "null", "--model.init_args.teacher_cache", str(cache_dir))
    results = {}
    for name, overrides in (
        ("live", ()),
        ("served", ("--model.init_args.teacher", served)),
        ("cache", cache),
    ):
        results[name] = run_fit(setup, work, name, args.steps, *overrides)
        print(name, results[name], flush=True)
    timing: dict[str, list[dict[str, Any]]] = {"look-ahead 2": [], "no look-ahead": []}
    # The timing runs' validation is not measured: keep it short.
    brief = ("--trainer.limit_val_batches", "2", "--model.init_args.teacher")
    for round_ in range(args.rounds):
        for name, spec in (("look-ahead 2", served), ("no look-ahead", no_look_ahead)):
            key = f"t{round_}-{name.replace(' ', '-')}"
            timing[name].append(run_fit(setup, work, key, args.timing_steps, *brief, spec))
            print(key, timing[name][-1], flush=True)
    return results, timing, alone


@contextlib.contextmanager
def serving(setup: Setup, args: argparse.Namespace, work: Path) -> Iterator[str]:
    """The URL of ``--url`` if given, else of a vLLM server of ``setup`` started here (stopped at the end)."""
    if args.url:  # a server already running (started as README shows)
        yield args.url
        return
    from distilkit.teachers.vllm_launcher import VLLMServer, vllm_python

    python = args.vllm_python or vllm_python()
    if python is None:
        sys.exit("no vLLM environment: run `bash .ci/vllm-env` and pass --vllm_python")
    server = VLLMServer(
        setup.served, python=python, served_model_name=setup.name, max_model_len=BLOCK + 1,
        log_path=work / "vllm.log", env=setup.server_env,
    )  # fmt: skip
    print("server:", " ".join(server.command()), f"(log {server.log_path})", flush=True)
    with server:
        print(f"ready in {server.ready_seconds:.0f} s, {server.memory_bytes() / 2**30:.2f} GiB", flush=True)
        yield server.url


def print_tables(
    setup: Setup,
    args: argparse.Namespace,
    results: dict[str, Any],
    timing: dict[str, list[dict[str, Any]]],
    alone: float,
) -> None:
    """The perplexity table, the look-ahead table (medians over the rounds) and the load average."""
    rows: list[list[object]] = [
        [
            name,
            f"{r['ppl']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['waited']:.1%}" if name == "served" else "",
            f"{r['peak_mib']:,.0f}",
        ]
        for name, r in results.items()
    ]
    print(f"\n{setup.title}, {args.steps} steps, teacher val ppl {results['live']['teacher_ppl']:.2f}")
    print_table(["teacher", "val ppl", "train tokens/s", "step waits on server", "peak RSS (MiB)"], rows)
    rounds: list[list[object]] = []
    for name, runs in timing.items():
        speeds = sorted(r["tokens_per_s"] for r in runs)
        waits = sorted(r["waited"] for r in runs)
        rounds.append([name, f"{speeds[len(speeds) // 2]:,.0f}", f"{waits[len(waits) // 2]:.1%}", len(runs)])
    print(f"\nserved, {args.timing_steps} steps a round; server alone {alone:,.0f} tokens/s")
    print_table(["served run", "train tokens/s (median)", "step waits on server (median)", "rounds"], rounds)
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", choices=("quickstart", "smollm2"), default="quickstart")
    parser.add_argument("--vllm_python", default=None, help="the vLLM environment's python (.ci/vllm-env)")
    parser.add_argument("--steps", type=int, default=100, help="steps of the perplexity runs")
    parser.add_argument("--timing_steps", type=int, default=40, help="steps of each look-ahead timing round")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds with and without look-ahead"
    )
    parser.add_argument("--alone_batches", type=int, default=8, help="batches the server scores alone")
    parser.add_argument("--corpus_chars", type=int, default=50_000, help="smollm2: characters of the corpus")
    parser.add_argument("--batch_size", type=int, default=4, help="smollm2: blocks a batch")
    parser.add_argument("--work", type=Path, default=None, help="where runs go (default: a temp folder)")
    parser.add_argument("--url", default=None, help="a running server of the teacher, named as the setup's")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="served-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.teacher == "smollm2":
        setup = smollm2_setup(work, args.corpus_chars, args.batch_size)
    else:
        setup = quickstart_setup()
    print(f"{setup.title}: serve {setup.served} as {setup.name!r}", flush=True)
    with serving(setup, args, work) as url:
        results, timing, alone = measure(setup, args, work, url)
    print_tables(setup, args, results, timing, alone)


if __name__ == "__main__":
    main()
