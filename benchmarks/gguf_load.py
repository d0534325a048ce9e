"""Loading a GGUF model: transformers' own load, distilkit's first load (conversion) and its cached load.

Each load runs in a fresh process (model and tokenizer, float32 unless ``--dtype``) and reports its wall
time (imports excluded) and the process's peak resident set (``ru_maxrss``, imports included; a process
that only imports is the baseline row). distilkit's two loads share a new, empty cache directory.
Run: ``make smollm2 && python benchmarks/gguf_load.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, print_table

SMOLLM2 = ROOT / "recipes" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(mode: str, file: Path, dtype_name: str) -> dict[str, float]:
    """One load in this process; seconds and peak RSS in MiB."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distilkit.models.gguf import load_gguf

    dtype, where = getattr(torch, dtype_name), {"gguf_file": file.name}
    start = time.perf_counter()  # imports are not timed (they are in the peak)
    if mode == "transformers":
        AutoTokenizer.from_pretrained(str(file.parent), **where)
        AutoModelForCausalLM.from_pretrained(str(file.parent), dtype=dtype, **where)
    elif mode != "imports":
        load_gguf(file, field="model", dtype=dtype)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file", type=Path, default=SMOLLM2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.file, args.dtype)))
        return
    if not args.file.is_file():
        sys.exit(f"{args.file} is missing: run `make smollm2` first")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {"DISTILKIT_CACHE": cache, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        labels = {
            "imports": "baseline: the imports only",
            "transformers": "transformers from_pretrained(gguf_file=...) + tokenizer",
            "first": "distilkit, first load (converts into the cache)",
            "cached": "distilkit, cached load (verified copy)",
        }
        for mode, label in labels.items():
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--file",
                str(args.file),
                "--dtype",
                args.dtype,
            ]
            result = subprocess.run(
                command, env={**os.environ, **env}, capture_output=True, text=True, check=True
            )
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append([label, f"{measured['seconds']:.1f}", f"{measured['peak_mib']:,.0f}"])
    print(f"{args.file.name}, {args.dtype}")
    print_table(["load", "seconds", "peak RSS MiB"], rows)


if __name__ == "__main__":
    main()
