"""The teacher's targets at every position, and their compact encoding (one byte per log-probability).

Two kinds of targets come from a row of teacher logits ``t`` at cache temperature τ,
p = softmax(t / τ):

- **top-k**: the K most likely ids, their log p (descending) and the log of the tail mass
  log(1 − Σ_K p), so the (K+1)-bucket distribution is exact;
- **top-k with tail draws**: the same, followed by S ids drawn from p restricted to the tail (the ids outside
  the top K, in proportion to p), with their log p, sorted by log p descending; every draw is at most as
  likely as the K-th id, so the K + S log-probabilities are descending as a whole and share one encoding;
- **sample**: S ids drawn from p (inverse CDF of uniforms from a per-block generator, so the draws do
  not depend on the device or on how blocks are spread over processes), with their log p, sorted by
  log p descending.

**Encoding of the sorted log-probabilities** ``l_0 ≥ l_1 ≥ … ≥ l_{K−1}`` (a byte each). Per position:
``offset`` = the smallest float16 ≥ l_0 and ``step`` = a float16 ≥ max_i g_i / 254, where g_i are the
gaps x_i − x_{i−1} of x_i = offset − l_i (x_{−1} = 0). Entry i is stored as the byte
c_i = C_i − C_{i−1} with C_i = round(x_i / step), and decoded as offset − step · Σ_{j≤i} c_j. Because
the C_i are rounded on one shared grid (not chained), every decoded value is within **step / 2** of the
teacher's, and c_i ≤ g_i / step + 1 ≤ 255 always fits a byte. The step depends on the largest gap
between consecutive kept entries, not on their whole range: on the shipped teacher (V = 4,096) the
top-64 range reaches 10.9 nats but the largest gap 7.6, so the error stays below 7.6 / 508 = 0.015 nats.
The bound exceeds 0.02 nats only at a position where two consecutive kept entries are more than
10.16 nats apart (the later one less than e^−10.16 ≈ 3.9e−5 times as likely as the one before); the
first entry is exact to float16 (its code is 0 whenever float16's rounding is below step / 2).

Log-probabilities below :data:`LOG_FLOOR` (p < 1.2e−38, float32's smallest normal) are stored as the
floor. The tail log-mass is stored in float16 (error ≤ 2⁻¹¹ · |log tail|, i.e. ≤ 0.016 nats above
e^−32); −inf (K = V) is kept exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Log-probabilities are stored no lower than this (float32's smallest normal, e^−87.3).
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)
#: The finest step (the smallest normal float16); used when all kept entries are (nearly) equal.
MIN_STEP = 2.0**-14
#: The largest gap, in steps, that a byte code always covers (254 + 1 for rounding = 255).
_GAP_STEPS = 254
#: Positions per piece when targets are computed from ``(T, V)`` logits (bounds the float32 temporaries).
_ROW_ELEMENTS = 2**25


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ids ``0 … vocab_size − 1``: uint16 up to 65,536."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit 32-bit ids")


def bytes_per_position(mode: str, entries: int, vocab_size: int) -> int:
    """Stored bytes per position: E·(id bytes + 1) + offset and step (float16) + the tail (top-k); E = K + S
    for top-k with S tail draws."""
    return entries * (id_dtype(vocab_size).itemsize + 1) + 4 + (2 if mode == "topk" else 0)


# ------------------------------------------------------------------------------------------------- targets
def _row_pieces(rows: int, vocab_size: int) -> list[slice]:
    step = max(1, _ROW_ELEMENTS // max(vocab_size, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def topk_targets(
    logits: Tensor, k: int, temperature: float, tail_uniforms: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The K most likely ids at each position, their log-probabilities and the tail's log-mass; with
    ``tail_uniforms``, followed by S draws from the tail.

    Args:
        logits: ``(n, V)`` teacher logits (any float dtype, any device).
        k: K, 1 ≤ K ≤ V.
        temperature: τ > 0; p = softmax(logits / τ).
        tail_uniforms: ``(n, S)`` numbers in [0, 1) (from :func:`block_uniforms`), or None: S ids are drawn
            by inverse CDF from p restricted to the ids outside the top K (p_v / tail for such v), K < V.

    Returns:
        ``ids (n, K [+ S])`` long, ``log_probs (n, K [+ S])`` float32 in descending order (the draws after the
        top K, each at most as likely as the K-th; repeats allowed), ``tail (n,)`` float32 = log Σ_{v not in
        the top K} p_v (computed as a log-sum-exp over the other logits, so it stays exact for tiny tails;
        −inf when K = V).
    """
    if tail_uniforms is not None and k >= logits.shape[-1]:
        raise ValueError(f"tail draws need K < V (K = {k}, V = {logits.shape[-1]})")
    ids, log_probs, tails = [], [], []
    for rows in _row_pieces(logits.shape[0], logits.shape[-1]):
        scaled = logits[rows].float() / temperature  # (n, V)
        total = scaled.logsumexp(-1, keepdim=True)  # (n, 1)
        top, top_ids = scaled.topk(k, dim=-1)  # (n, K), descending
        rest = scaled.scatter(-1, top_ids, float("-inf"))  # (n, V) the logits outside the top K
        tails.append(rest.logsumexp(-1) - total.squeeze(-1))
        if tail_uniforms is None:
            ids.append(top_ids)
            log_probs.append(top - total)
            continue
        rest_log_p = rest.sub_(total)  # (n, V) log p outside the top K, −inf at the top K
        draws, drawn = _inverse_cdf(rest_log_p, tail_uniforms[rows].to(logits.device, torch.float32))
        ids.append(torch.cat([top_ids, draws], -1))  # (n, K+S)
        log_probs.append(torch.cat([top - total, drawn], -1))
    return torch.cat(ids), torch.cat(log_probs), torch.cat(tails)


def _inverse_cdf(log_p: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Ids drawn from ``exp(log_p)`` ``(n, V)`` (normalised here) by inverse CDF of ``uniforms (n, S)``, with
    their log p, sorted by log p descending: ``(n, S)`` each. Ids of probability 0 are never drawn (unless
    a whole row is 0)."""
    cdf = log_p.exp().cumsum(-1)  # (n, V)
    draws = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)  # (n, S)
    draws = draws.clamp_max(log_p.shape[-1] - 1)
    drawn, order = log_p.gather(-1, draws).sort(dim=-1, descending=True, stable=True)  # (n, S)
    return draws.gather(-1, order), drawn


def sample_targets(logits: Tensor, uniforms: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """S ids drawn from p = softmax(logits / τ) by inverse CDF, with their log p, sorted by log p descending.

    Args:
        logits: ``(n, V)`` teacher logits (any float dtype, any device).
        uniforms: ``(n, S)`` numbers in [0, 1) (from :func:`block_uniforms`: the draws depend on them and
            on the logits only, not on the device).
        temperature: τ > 0.

    Returns:
        ``ids (n, S)`` long (repeats allowed: each draw counts once) and ``log_probs (n, S)`` float32.
        The float32 CDF gives each id its probability to within about 1e−7 (each step of a cumulative
        sum rounds once); ids of probability 0 are never drawn.
    """
    ids, log_probs = [], []
    uniforms = uniforms.to(logits.device, torch.float32)
    for rows in _row_pieces(logits.shape[0], logits.shape[-1]):
        log_p = logits[rows].float().div(temperature).log_softmax(-1)  # (n, V)
        draws, drawn = _inverse_cdf(log_p, uniforms[rows])  # (n, S) each
        ids.append(draws)
        log_probs.append(drawn)
    return torch.cat(ids), torch.cat(log_probs)


def block_seed(seed: int, split: str, block: int) -> int:
    """A 63-bit seed for one block, a hash of (seed, split, block): the same block always draws the same."""
    digest = hashlib.sha256(f"{seed}/{split}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def block_uniforms(seed: int, split: str, block: int, positions: int, samples: int) -> Tensor:
    """``(positions, S)`` float32 uniforms in [0, 1) for one block, from its own CPU generator."""
    generator = torch.Generator().manual_seed(block_seed(seed, split, block))
    return torch.rand((positions, samples), generator=generator)


# ------------------------------------------------------------------------------------------------ encoding
@dataclass
class EncodedTargets:
    """One or more positions' targets, compact (numpy arrays as stored).

    Attributes:
        ids: ``(..., K)`` uint16 (V ≤ 65,536) or uint32.
        codes: ``(..., K)`` uint8, the step counts between consecutive log-probabilities.
        offset: ``(...)`` float16, the smallest float16 ≥ the largest kept log-probability.
        step: ``(...)`` float16, the quantisation step (the decoding error is at most step / 2).
        tail: ``(...)`` float16 log of the tail mass (top-k), or None (sample).
    """

    ids: np.ndarray
    codes: np.ndarray
    offset: np.ndarray
    step: np.ndarray
    tail: np.ndarray | None = None

    def log_probs(self) -> np.ndarray:
        """The decoded ``(..., K)`` float32 log-probabilities (see :func:`decode_log_probs`)."""
        return decode_log_probs(self.codes, self.offset, self.step)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by their stored names (``tail`` only in top-k)."""
        named = {"ids": self.ids, "codes": self.codes, "offset": self.offset, "step": self.step}
        return named if self.tail is None else {**named, "tail": self.tail}


def _float16_at_least(values: np.ndarray) -> np.ndarray:
    """The smallest float16 ≥ each float64 value."""
    rounded = values.astype(np.float16)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], np.float16(np.inf))
    return rounded


def encode(ids: Tensor, log_probs: Tensor, tail: Tensor | None, vocab_size: int) -> EncodedTargets:
    """Encode targets whose log-probabilities are sorted in descending order along the last axis.

    Args:
        ids: ``(..., K)`` token ids.
        log_probs: ``(..., K)`` their log-probabilities, descending.
        tail: ``(...)`` the tail's log-mass, or None.
        vocab_size: V, which sets the id type.

    Returns:
        The :class:`EncodedTargets`; :func:`decode_log_probs` recovers each log-probability within
        ``step / 2`` (see the module docstring for the scheme).
    """
    lp = np.maximum(log_probs.detach().double().cpu().numpy(), LOG_FLOOR)  # (..., K)
    if np.any(np.diff(lp, axis=-1) > 0):
        raise ValueError("log_probs must be sorted in descending order along the last axis")
    offset = _float16_at_least(lp[..., 0])  # (...)
    below = offset.astype(np.float64)[..., None] - lp  # (..., K) x_i ≥ 0, ascending
    gaps = np.diff(below, axis=-1, prepend=0.0)  # (..., K)
    step = _float16_at_least(np.maximum(gaps.max(-1) / _GAP_STEPS, MIN_STEP))  # (...)
    levels = np.rint(below / step.astype(np.float64)[..., None])  # (..., K) C_i on one grid
    codes = np.diff(levels, axis=-1, prepend=0.0)  # (..., K)
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) <= 255, "a gap overflowed its byte"
    return EncodedTargets(
        ids=ids.detach().cpu().numpy().astype(id_dtype(vocab_size)),
        codes=codes.astype(np.uint8),
        offset=offset,
        step=step,
        tail=None if tail is None else tail.detach().double().cpu().numpy().astype(np.float16),
    )


def decode_log_probs(codes: np.ndarray, offset: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``(..., K)`` float32 log-probabilities: offset − step · cumulative sum of the codes.

    In numpy: the sums are exact in float32 (at most 255·K < 2²⁴), and numpy's single thread is
    steady where the reader runs (torch's thread pool can stall in a busy data loader)."""
    levels = codes.cumsum(-1, dtype=np.float32)  # (..., K)
    return offset.astype(np.float32)[..., None] - step.astype(np.float32)[..., None] * levels


def error_bound(step: np.ndarray) -> np.ndarray:
    """The largest decoding error of each position's log-probabilities: step / 2 (float32 rounding aside)."""
    return step.astype(np.float32) / 2
