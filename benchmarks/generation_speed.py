"""Sampling speed: distilkit's KV-cache loop vs re-running the whole prefix each step vs HF ``generate``.

All three sample ``--new`` tokens (temperature 1, no top-p, no EOS stop) after the same ``--batch`` x
``--prompt`` random prompts, run interleaved (A, B, C, A, ...) on the shipped teacher (``recipes/teacher``,
GPT-2 4x256, V=4096). The no-cache reference keeps only the last position's logits (``logits_to_keep=1``),
so the gap it shows is the cache's alone. Prints sampled tokens per second (batch x new / median seconds).
Run: ``python benchmarks/generation_speed.py [--threads 1] [--dtype bfloat16] [--device cuda]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import interleaved_medians, print_table
from transformers import AutoModelForCausalLM

from distilkit.models.generation import sample_tokens

TEACHER = Path(__file__).resolve().parents[1] / "recipes" / "teacher"


def full_prefix_sampler(model: torch.nn.Module, ids: torch.Tensor, new: int, generator: torch.Generator):
    """The cache-free reference: each step runs the model on every token so far."""
    tokens = ids
    with torch.no_grad():
        for _ in range(new):
            logits = (
                model(input_ids=tokens, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            )  # (B, V)
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (B, 1)
            tokens = torch.cat([tokens, token], dim=1)  # (B, T + 1)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="float32 (CPU default) or bfloat16 (as stored)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 keeps its default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU, oversubscribed threads distort the timings
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=getattr(torch, args.dtype)).to(device).eval()
    model.generation_config.eos_token_id = None  # every variant samples exactly --new tokens
    model.generation_config.pad_token_id = 0
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    generator = torch.Generator(device=device).manual_seed(0)

    def kv_loop() -> torch.Tensor:
        return sample_tokens(model, ids, mask, max_new_tokens=args.new, generator=generator).tokens

    def no_cache() -> torch.Tensor:
        return full_prefix_sampler(model, ids, args.new, generator)

    def hf_generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=mask, do_sample=True, top_p=1.0, max_new_tokens=args.new
            )

    for fn in (kv_loop, no_cache, hf_generate):
        assert fn().shape == (args.batch, args.prompt + args.new), fn.__name__
    seconds = interleaved_medians(
        {"distilkit sample_tokens (KV cache)": kv_loop, "whole prefix each step": no_cache,
         "HF model.generate": hf_generate},
        repeats=args.repeats,
    )  # fmt: skip
    tokens = args.batch * args.new
    base = seconds["distilkit sample_tokens (KV cache)"]
    rows = [[name, f"{t * 1e3:.0f}", f"{tokens / t:.0f}", f"{t / base:.2f}"] for name, t in seconds.items()]
    threads = torch.get_num_threads()
    shape = f"{args.batch} prompts x {args.prompt} tokens + {args.new} new"
    print(f"{shape}, {args.dtype} on {device} ({threads} threads)")
    print_table(["sampler", "ms per batch", "tokens/s", "time / KV loop"], rows)


if __name__ == "__main__":
    main()
