"""Divergences estimated from the teacher's draws: f(x) at x ∼ p whose mean under p is the divergence.

A sampled teacher cache keeps, per position, ids x_i drawn from the teacher's distribution p with log p(x_i)
(and a top-k cache with tail draws keeps the head exactly and draws the rest). The student's log q is known
everywhere. A divergence that can be written D = E_{x∼p}[f(x)] with f depending only on p(x) and q(x) is then
estimated by Σ_i w_i f(x_i): unbiased, and so is its gradient (the draws do not depend on the student). Its
variance is what decides whether it is usable, and it is bounded exactly when f is:

- forward KL, f = log p − log q: the classic sampled KD estimate (Anshumann et al. 2025);
- skew forward KL(α), KL(p ‖ α·p + (1 − α)·q): f = log p − log(α·p + (1 − α)·q) ≤ log(1/α);
- KL(q ‖ m) with m = w·q + (1 − w)·p (the skew reverse KL at w = α; the generalized JSD's second term at
  w = 1 − β): Σ q log q − Σ q log m = −log w − Σ_v q_v log(1 + c·p_v/q_v) with c = (1 − w)/w, and
  Σ_v q_v log(1 + c·p_v/q_v) = E_p[(q/p)·log(1 + c·p/q)] = E_p[c·h(u)] with u = log c + log p − log q and
  h(u) = log(1 + e^u)·e^−u ∈ (0, 1]: f = −log w − c·h(u) lies in [−log w − c, −log w];
- total variation, ½·Σ|p − q| = Σ (p − q)_+ = E_p[(1 − q/p)_+] ∈ [0, 1].

The reverse KL, KL(q‖p) = E_p[(q/p)·log(q/p)], is the w → 0 end of the third form: its f is unbounded (c → ∞)
where the student puts mass the teacher finds unlikely, which is exactly what it penalises and what draws
from p rarely visit. Its estimate is unbiased but of unbounded variance, so it is refused (and so is the
symmetric KL, which contains it); a top-k cache gives it the bucketed form instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distilkit.losses.base import log_mixture

#: Below this, h(u) = log(1 + e^u)·e^−u equals 1 to float32 precision (and e^u would underflow further down).
_FLAT = -80.0


def softplus_ratio(u: Tensor) -> Tensor:
    """h(u) = log(1 + e^u) / e^u, stable for every u: 1 as u → −∞, u·e^−u as u → ∞; decreasing, in (0, 1]."""
    u = u.clamp_min(_FLAT)
    return torch.exp(torch.log(F.softplus(u)) - u)


def reverse_mixture_draws(log_p: Tensor, log_q: Tensor, weight_q: float) -> Tensor:
    """f at the draws with E_{x∼p}[f] = KL(q ‖ w·q + (1 − w)·p), w = ``weight_q`` in (0, 1]: −log w − c·h(u)
    with c = (1 − w)/w and u = log c + log p − log q (module docstring); each value in [−log w − c, −log w].

    Args:
        log_p: ``(M, E)`` the teacher's log-probabilities at the draws.
        log_q: ``(M, E)`` the student's at the same ids.
        weight_q: w > 0 (w = 0 is the reverse KL, which has no bounded estimate).
    """
    if not 0 < weight_q <= 1:
        raise ValueError(f"weight_q must be in (0, 1], got {weight_q}")
    if weight_q == 1:
        return torch.zeros_like(log_q)  # KL(q‖q)
    c = (1 - weight_q) / weight_q
    return -math.log(weight_q) - c * softplus_ratio(log_p - log_q + math.log(c))


def forward_mixture_draws(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """f at the draws with E_{x∼p}[f] = KL(p ‖ a·p + (1 − a)·q), a = ``weight_p`` in [0, 1]:
    log p − log(a·p + (1 − a)·q), at most log(1/a) (the forward KL at a = 0)."""
    return log_p - log_mixture(log_p, log_q, weight_p)


def total_variation_draws(log_p: Tensor, log_q: Tensor) -> Tensor:
    """f at the draws with E_{x∼p}[f] = ½·Σ|p − q|: (1 − q/p)_+, in [0, 1] (q/p capped at 1 before the
    exponential, so nothing overflows)."""
    return 1 - torch.exp((log_q - log_p).clamp_max(0))
