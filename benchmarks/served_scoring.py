"""A teacher behind a vLLM CPU server: time to ready, memory, and scoring throughput (prompt tokens/s) of
:class:`distilkit.teachers.server.ServedTeacher` at K log-probabilities per position.

    VLLM_PY=$(bash .ci/vllm-env)
    python benchmarks/served_scoring.py --vllm_python "$VLLM_PY"                       # a tiny random Llama
    python benchmarks/served_scoring.py --vllm_python "$VLLM_PY" --model DIR --name smollm2 --compare

Without ``--model`` it writes a 2-layer random Llama with the project's tokenizer (recipes/teacher). The
blocks are real text (the built-in Python reference corpus) in the model's tokenizer. ``--compare`` also
runs the model with transformers in float32 here and prints the largest difference of the served top-K
log-probabilities from its log-softmax. Memory is the resident size of the server's process group.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import ROOT, print_table
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distilkit.data.corpus import builtin_documents
from distilkit.teachers.server import ServedTeacher
from distilkit.teachers.vllm_launcher import VLLMServer, vllm_python

TINY_LLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}


def tiny_llama(path: Path) -> Path:
    """A 2-layer random Llama with the tokenizer of recipes/teacher, saved as a Hugging Face directory."""
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "recipes" / "teacher")
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **TINY_LLAMA
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def text_blocks(tokenizer, count: int, length: int) -> torch.Tensor:
    """``(count, length)`` ids of the built-in corpus's text, in order."""
    text = " ".join(doc["text"] for doc in builtin_documents("python-reference"))
    ids = tokenizer(text[: count * length * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        sys.exit(f"the corpus gives {len(ids)} tokens, fewer than {count} x {length}")
    return torch.tensor(ids[: count * length]).view(count, length)  # (N, T)


class PeakMemory:
    """Samples the server's resident memory every half second while active."""

    def __init__(self, server: VLLMServer) -> None:
        self.server, self.peak, self._stop = server, server.memory_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.server.memory_bytes())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def max_difference(model_dir: Path, blocks: torch.Tensor, targets) -> float:
    """The largest |served log p − transformers float32 log-softmax| at the served ids."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for row in range(blocks.shape[0]):
            log_p = model(blocks[row : row + 1]).logits.float().log_softmax(-1)[0]  # (T, V)
            expected = log_p.gather(-1, targets.ids[row])  # (T, K)
            worst = max(worst, float((expected - targets.log_probs[row]).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm_python", default=None, help="the vLLM environment's python (.ci/vllm-env)")
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory")
    parser.add_argument("--name", default="teacher", help="the served model name")
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=16, help="blocks scored per setting")
    parser.add_argument("--in_flight", type=int, nargs="+", default=[1, 4], help="max_in_flight settings")
    parser.add_argument("--compare", action="store_true", help="compare with transformers in float32")
    parser.add_argument("--log", type=Path, default=None, help="the server's log file")
    args = parser.parse_args()

    python = args.vllm_python or vllm_python()
    if python is None:
        sys.exit("no vLLM environment: run `bash .ci/vllm-env` and pass --vllm_python")
    work = Path(tempfile.mkdtemp(prefix="served-scoring-"))
    model_dir = args.model or tiny_llama(work / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = text_blocks(tokenizer, args.blocks, args.block_size)
    server = VLLMServer(
        model_dir,
        python=python,
        served_model_name=args.name,
        max_model_len=args.block_size + 1,
        log_path=args.log or work / "vllm.log",
    )
    print("server:", " ".join(server.command()), f"(log {server.log_path})", flush=True)
    rows = []
    with server:
        ready_memory = server.memory_bytes()
        print(f"ready in {server.ready_seconds:.0f} s, {ready_memory / 2**30:.2f} GiB", flush=True)
        for in_flight in args.in_flight:
            with ServedTeacher(server.url, args.name, top_k=args.top_k, max_in_flight=in_flight) as teacher:
                teacher.check(tokenizer, block_size=args.block_size)
                teacher.score(blocks[:1])  # warm
                with PeakMemory(server) as memory:
                    start = time.perf_counter()
                    targets = teacher.score(blocks)
                    seconds = time.perf_counter() - start
            tokens = blocks.numel()
            rows.append(
                [
                    args.name,
                    args.top_k,
                    f"{args.blocks} x {args.block_size}",
                    in_flight,
                    f"{server.ready_seconds:.0f}",
                    f"{ready_memory / 2**30:.2f}",
                    f"{memory.peak / 2**30:.2f}",
                    f"{tokens / seconds:,.0f}",
                ]
            )
            print(rows[-1], flush=True)
    headers = ["model", "K", "blocks", "in flight", "ready (s)", "GiB ready", "GiB peak", "prompt tokens/s"]
    print_table(headers, rows)
    if args.compare:
        worst = max_difference(model_dir, blocks, targets)
        print(f"largest |served - transformers| log p at the served ids: {worst:.2e}")


if __name__ == "__main__":
    main()
