"""Distillation targets that keep a few entries of the teacher's distribution per position, and the losses
computed from them without the teacher's full logits (an offline teacher cache stores such targets).

Three kinds, all at the cache's temperature τ (the loss's temperature must equal it):

- **top-k** (``mode="topk"``): the teacher's K most likely ids with their log p and the log of the tail
  mass. The student's distribution is grouped the same way, q at the K ids plus
  q_tail = 1 − Σ_K q (a log-sum-exp over the other logits, exact for tiny tails), and the loss's own
  divergence is applied to the two (K+1)-bucket distributions. With K = V this *is* the full
  divergence; with K < V it is the divergence of the coarse-grained distributions, which for the
  f-divergences here (KL in either direction, JSD, TVD …) is at most the full one (data processing
  inequality). It does not see how the tail's mass is spread: the bucketed forward KL equals the full KL
  against the teacher's head with the tail's mass spread over the other ids in proportion to the student's
  own q (same value, same gradient q − p̃), so the student's tail keeps its own shape.
- **sample** (``mode="sample"``): S ids x_1 … x_S drawn from p, with log p(x_i) and weights w_i
  (1/S each). A divergence that is an expectation under p, D = E_{x∼p}[f(x)], is estimated by
  Σ_i w_i f(x_i) (:meth:`~distilkit.losses.DistillationLoss.draw_divergence`): unbiased, and so is its
  gradient. For KL(p‖q), f = log p − log q and the gradient is q − p̂ (p̂ the draws' frequencies;
  "Sparse Logit Sampling", Anshumann et al., ACL 2025). A single estimate can be negative.
- **top-k with tail draws** (``mode="topk"``, ``tail_draws`` = S): the K most likely ids and the tail's mass
  as in top-k, then S ids drawn from the teacher's tail; the weights are p_k for a head id and tail / S for
  each draw, so Σ_i w_i f(x_i) is a stratified estimate of E_p[f] (head exact, tail sampled: unbiased, with
  less variance than S + K plain draws where the head holds most of the mass). Losses with an estimate from
  draws use it; the others use the (K+1) buckets of the head and the tail.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distilkit.data.teacher_cache.targets import MODES, SparseTargets
from distilkit.errors import ConfigError

__all__ = ["MODES", "SparseTargets"]  # the targets live with the cache that stores them


class _BucketLogProbs(torch.autograd.Function):
    """The student's log-probabilities at some ids, of every other id together (``tail``), and at extra ids.

    ``(logits (M, V), ids (M, K), tail, extra (M, E) | None) -> (M, K [+1] [+E])``: ℓ_k = z_{id_k} − lse(z),
    ℓ_tail = log Σ_{v∉ids} q_v (a sum of the other probabilities: no cancellation for tiny tails), and
    ℓ_e = z_{x_e} − lse(z) at the extra ids (e.g. the labels, for the cross-entropy), which do not change
    the buckets. Since ∂ℓ_k/∂z = e_{id_k} − q, ∂ℓ_e/∂z = e_{x_e} − q and ∂ℓ_tail/∂z = q·[v∉ids] / q_tail − q,
    the gradient for upstream g is q_rest·(g_tail / q_tail − Σg), plus g_k − q_k·Σg at the ids, plus g_e at
    the extra ids: one saved ``(M, V)`` tensor and one pass, where autograd through gather, scatter and
    two log-sum-exps makes several.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        ids: Tensor,
        tail: bool,
        extra: Tensor | None,
    ) -> Tensor:
        total = logits.logsumexp(-1, keepdim=True)  # (M, 1)
        kept = logits.gather(-1, ids) - total  # (M, K)
        extras = [] if extra is None else [logits.gather(-1, extra) - total]  # (M, E)
        want_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        if not (tail or want_grad):
            return torch.cat([kept, *extras], dim=-1)
        probs = (logits - total).exp_()  # (M, V)
        if not tail:
            ctx.save_for_backward(probs, ids, None, None, extra)  # type: ignore[arg-type]  # None is allowed
            return torch.cat([kept, *extras], dim=-1)
        q_kept = kept.exp()  # (M, K)
        rest = probs.scatter_(-1, ids, 0.0)  # (M, V) q outside the ids
        q_tail = rest.sum(-1, keepdim=True).clamp_min_(_TINY)  # (M, 1)
        if want_grad:
            ctx.save_for_backward(rest, ids, q_kept, q_tail, extra)  # type: ignore[arg-type]  # None is allowed
        return torch.cat([kept, q_tail.log(), *extras], dim=-1)  # (M, K+1+E)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        probs, ids, q_kept, q_tail, extra = ctx.saved_tensors  # type: ignore[attr-defined]
        total = grad.sum(-1, keepdim=True)  # (M, 1) Σg
        k = ids.shape[-1]
        if q_tail is None:  # probs is q: grad = e_ids·g − q·Σg
            out = (probs * -total).scatter_add_(-1, ids, grad[:, :k])  # (M, V)
        else:  # probs is q_rest, zero at the ids
            out = probs * (grad[:, k : k + 1] / q_tail - total)  # (M, V)
            out.scatter_add_(-1, ids, grad[:, :k] - q_kept * total)
            k += 1
        if extra is not None:
            out.scatter_add_(-1, extra, grad[:, k:])
        return out, None, None, None


_TINY = torch.finfo(torch.float32).tiny


def bucket_log_probs(logits: Tensor, ids: Tensor, tail: bool, extra: Tensor | None = None) -> Tensor:
    """Log-softmax of ``logits (M, V)`` at ``ids (M, K)``, then (``tail``) the log-mass of all other ids,
    then at the ``extra (M, E)`` ids: ``(M, K [+1] [+E])``. Ids may repeat only without a tail."""
    if torch.compiler.is_compiling():  # let the compiler fuse the plain formula and its gradient
        total = logits.logsumexp(-1, keepdim=True)  # (M, 1)
        columns = [logits.gather(-1, ids) - total]  # (M, K)
        if tail:
            columns.append(logits.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - total)
        if extra is not None:
            columns.append(logits.gather(-1, extra) - total)  # (M, E)
        return torch.cat(columns, dim=-1)
    return _BucketLogProbs.apply(logits, ids, tail, extra)


def student_buckets(
    student_logits: Tensor, targets: SparseTargets, extra: Tensor | None = None, draws: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The student's log-probabilities grouped as the targets are, and at ``extra`` ids.

    Args:
        student_logits: ``(M, V)`` float32 student logits, already divided by the temperature.
        targets: targets for the same M positions.
        extra: ``(M, E)`` further ids whose log-probabilities are wanted (e.g. the labels), or None.
        draws: log q at every entry of weighted targets (an estimate from draws), not the buckets.

    Returns:
        ``(buckets, extra log-probs (M, E) or None)``: with ``draws``, ``(M, E)`` log q at every entry;
        else ``(M, K+1)`` for top-k (the K head ids, then the tail), ``(M, K)`` for top-k with K = V and for
        sampled targets (log q at the drawn ids).
    """
    if draws:
        ids, tail = targets.ids, False
    else:
        ids = targets.ids if targets.tail_draws == 0 else targets.ids[:, : targets.head]  # (M, K)
        tail = targets.mode == "topk" and ids.shape[-1] < student_logits.shape[-1]
    out = bucket_log_probs(student_logits, ids, tail, extra)
    width = ids.shape[-1] + int(tail)
    return out[:, :width], (None if extra is None else out[:, width:])


def teacher_buckets(targets: SparseTargets, tail: bool) -> Tensor:
    """The teacher's log-probabilities in the buckets of :func:`student_buckets` (top-k targets): the K
    head ids, then the tail when ``tail`` (the student's buckets have K + 1 columns, i.e. K < V)."""
    head = targets.log_probs[:, : targets.head]  # (M, K)
    if not tail or targets.tail is None:
        return head
    return torch.cat([head, targets.tail.unsqueeze(-1)], dim=-1)  # (M, K+1)


def topk_buckets(student_logits: Tensor, targets: SparseTargets) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's (K+1)-bucket log-probabilities: the K head ids, then the tail.

    Args:
        student_logits: ``(M, V)`` float32 student logits, already divided by the temperature.
        targets: top-k targets for the same M positions.

    Returns:
        ``(student (M, K+1), teacher (M, K+1))`` log-probabilities (``(M, K)`` each when K = V: no tail).
        Each row is normalised, so it is also a valid row of logits for a divergence.
    """
    student, _ = student_buckets(student_logits, targets)
    return student, teacher_buckets(targets, tail=student.shape[-1] > targets.head)


def draw_estimate(values: Tensor, targets: SparseTargets) -> Tensor:
    """Σ_i w_i f(x_i) per position from ``values (M, E)`` = f at the targets' entries: ``(M,)``, an unbiased
    estimate of E_{x∼p}[f(x)] (weighted targets)."""
    assert targets.weights is not None
    return (targets.weights * values).sum(-1)


def sampled_forward_kl(student_logits: Tensor, targets: SparseTargets) -> Tensor:
    """Monte-Carlo forward KL per position: Σ_i w_i (log p(x_i) − log q(x_i)).

    Args:
        student_logits: ``(M, V)`` float32 student logits, already divided by the temperature.
        targets: weighted targets (sampled, or top-k with tail draws) for the same M positions.

    Returns:
        ``(M,)``; its gradient with respect to the logits is q − Σ_i w_i e_{x_i}.
    """
    log_q, _ = student_buckets(student_logits, targets, draws=True)
    return draw_estimate(targets.log_probs - log_q, targets)


def check_sparse_mode(loss_name: str, supported: tuple[str, ...], mode: str, draws: bool = True) -> None:
    """Refuse targets of ``mode`` for a loss that supports only ``supported`` (a ConfigError naming both);
    ``draws``: whether the loss, at its present settings, has a bounded estimate from draws (sampled targets
    need one)."""
    if mode in supported and (mode != "sample" or draws):
        return
    if not supported:
        raise ConfigError(
            "model.loss",
            loss_name,
            "needs the teacher's full logits, which a teacher cache does not keep",
            "train it with a live teacher, or choose a divergence such as ForwardKLLoss",
        )
    raise ConfigError(
        "model.loss",
        loss_name,
        f"cannot be computed from {mode} targets (from the teacher's draws it would weight each by q/p, "
        "unbounded where the student puts mass the teacher does not: no estimate of bounded variance)",
        "use ForwardKLLoss, GeneralizedJSDLoss (beta < 1), SkewForwardKLLoss, SkewReverseKLLoss (alpha > 0) "
        "or TVDLoss with a sampled cache, or make a top-k cache (distilkit cache --mode topk)",
    )
