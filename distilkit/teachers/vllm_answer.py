"""One block's scoring request to a vLLM server, its answer read into top-k targets, and its refusals.

The request (``POST /v1/completions``) sends the block's T token ids as the prompt and asks for K
log-probabilities at every prompt position and at one generated token::

    {"model": M, "prompt": [x_0 … x_{T-1}], "max_tokens": 1, "temperature": 0,
     "prompt_logprobs": K, "logprobs": K, "return_token_ids": true, "return_tokens_as_token_ids": true}

In ``choices[0]`` of the answer, ``prompt_logprobs[i]`` (null for i = 0) maps token ids to
``{"logprob", "rank", "decoded_token"}``: the K most likely ids of position i given x_<i, plus x_i itself
when it is not among them (then K + 1 entries). ``logprobs.top_logprobs[0]`` maps ``"token_id:N"`` to
the K most likely ids after the whole block. So target position t (the prediction of token t + 1, as in a
teacher cache) is ``prompt_logprobs[t + 1]`` for t < T − 1 and the generated token's list for t = T − 1:
all T positions, as a cache holds them.

**The actual next token.** The targets are exactly a top-k cache's (K ids, their log p descending, the
tail's log-mass), so every loss that trains from a cache trains from a server unchanged. The log p of the
actual next token x_{t+1} is kept beside them (``next_token``, ``(T − 1,)``: the teacher's NLL of the
data); when x_{t+1} is outside the top K its mass is part of the tail, and its log p is checked to lie at
or below the K-th.

**The tail** is log(1 − Σ_K p) from the K returned values, computed in float64 (the server rounds each
log p to float32, so a tail below about K·1e−7 is only as exact as that; it is floored at
:data:`~distilkit.data.teacher_cache.codec.LOG_FLOOR`, as the cache stores it; −inf when K = V).

Nothing partial is returned: a wrong number of positions or entries, ids outside the vocabulary, values
that are not finite log-probabilities, probabilities summing above 1, or an actual token ranked above the
K-th raise :class:`AnswerError` naming the position.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distilkit.data.teacher_cache.codec import LOG_FLOOR
from distilkit.errors import ConfigError

#: How far above 1 the K probabilities may sum (float32 rounding of K values) before the answer is refused.
SUM_TOLERANCE = 1e-4
#: How far the actual token's log p may lie above the K-th kept value (rounding) when it is not kept.
RANK_TOLERANCE = 1e-5


#: vLLM's refusal of a K above its ``--max-logprobs``: the K asked for, the limit.
LIMIT_MESSAGE = re.compile(r"logprobs of (\d+), which is greater than max allowed: (\d+)")
MODEL_FIX = "set teacher.model to a served name, or start the server with --served-model-name"
TOKENIZER_FIX = "serve the teacher with the run's tokenizer, or set data.tokenizer to the teacher's"


class AnswerError(ValueError):
    """The server's answer is not a complete, well-formed scoring of the block sent (the message says how)."""


@dataclass(frozen=True)
class BlockScores:
    """One block's targets, as numpy arrays.

    Attributes:
        ids: ``(T, K)`` int64 the K most likely next-token ids at each position.
        log_probs: ``(T, K)`` float32 their log-probabilities, descending.
        tail: ``(T,)`` float32 log of the mass outside ``ids``.
        next_token: ``(T − 1,)`` float32 log p of the actual next token x_{t+1} at position t.
    """

    ids: np.ndarray
    log_probs: np.ndarray
    tail: np.ndarray
    next_token: np.ndarray


def scoring_request(model: str, prompt: Sequence[int], top_k: int) -> dict[str, Any]:
    """The body of ``POST /v1/completions`` that scores ``prompt`` (T ids) with K log-probabilities."""
    return {
        "model": model,
        "prompt": [int(token) for token in prompt],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": top_k,
        "logprobs": top_k,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }


def read_scores(answer: Any, prompt: Sequence[int], top_k: int, vocab_size: int) -> BlockScores:
    """The block's targets from the server's answer.

    Args:
        answer: the decoded JSON answer to :func:`scoring_request`.
        prompt: the T ids that were sent.
        top_k: K.
        vocab_size: V; every returned id must lie in ``[0, V)``.

    Raises:
        AnswerError: the answer is incomplete, malformed or inconsistent (the message names the position).
    """
    choice = _one_choice(answer)
    tokens = [int(token) for token in prompt]
    sent = choice.get("prompt_token_ids")
    if sent is not None and list(sent) != tokens:
        raise AnswerError(f"scored {len(sent)} other token ids than the {len(tokens)} sent")
    positions = choice.get("prompt_logprobs")
    if not isinstance(positions, list) or len(positions) != len(tokens):
        count = len(positions) if isinstance(positions, list) else "no"
        raise AnswerError(f"has {count} prompt positions for a block of {len(tokens)} tokens")
    if positions[0] is not None:
        raise AnswerError("has log-probabilities at position 0, where vLLM gives none")
    rows, next_token = [], []
    for t in range(len(tokens) - 1):
        entries = _prompt_entries(positions[t + 1], t)
        ids, log_probs = _top(entries, top_k, tokens[t + 1], t)
        actual = entries.get(tokens[t + 1])
        if actual is None:
            raise AnswerError(f"position {t} lacks the actual next token {tokens[t + 1]}")
        if tokens[t + 1] not in ids and actual > log_probs[-1] + RANK_TOLERANCE:
            raise AnswerError(
                f"position {t}: the actual next token lies above the K-th value but is not kept"
            )
        rows.append((ids, log_probs))
        next_token.append(actual)
    last, sampled = _generated_entries(choice, len(tokens) - 1)
    rows.append(_top(last, top_k, sampled, len(tokens) - 1))
    kept_ids = np.array([row[0] for row in rows], dtype=np.int64).reshape(len(tokens), top_k)  # (T, K)
    kept = np.array([row[1] for row in rows], dtype=np.float64).reshape(len(tokens), top_k)  # (T, K)
    if kept_ids.min() < 0 or kept_ids.max() >= vocab_size:
        bad = int(kept_ids.max() if kept_ids.max() >= vocab_size else kept_ids.min())
        raise AnswerError(f"returns token id {bad}, outside the run's vocabulary of {vocab_size}")
    tail = _tail(kept, vocab_size)  # (T,)
    return BlockScores(
        ids=kept_ids,
        log_probs=kept.astype(np.float32),
        tail=tail.astype(np.float32),
        next_token=np.array(next_token, dtype=np.float32),
    )


def _one_choice(answer: Any) -> Mapping[str, Any]:
    choices = answer.get("choices") if isinstance(answer, Mapping) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], Mapping):
        raise AnswerError("is not a completion with one choice")
    return choices[0]


def _prompt_entries(position: Any, t: int) -> dict[int, float]:
    """``{id: log p}`` of one prompt position (``{"123": {"logprob": …, "rank": …}, …}``)."""
    if not isinstance(position, Mapping):
        raise AnswerError(f"position {t} holds no log-probabilities")
    try:
        return {int(key): _log_prob(value["logprob"], t) for key, value in position.items()}
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, AnswerError):
            raise
        raise AnswerError(f"position {t} is malformed ({err!r})") from None


def _generated_entries(choice: Mapping[str, Any], t: int) -> tuple[dict[int, float], int]:
    """``({id: log p}, sampled id)`` of the generated token's list (``{"token_id:N": log p, …}``)."""
    try:
        logprobs = choice["logprobs"]
        top, sampled = logprobs["top_logprobs"][0], logprobs["tokens"][0]
        entries = {_token_id(key): _log_prob(value, t) for key, value in top.items()}
        return entries, _token_id(sampled)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        if isinstance(err, AnswerError):
            raise
        raise AnswerError(f"position {t} (after the block) is malformed ({err!r})") from None


def _token_id(key: str) -> int:
    if not (isinstance(key, str) and key.startswith("token_id:")):
        raise ValueError(f"token {key!r} is not 'token_id:N' (send return_tokens_as_token_ids)")
    return int(key.removeprefix("token_id:"))


def _log_prob(value: Any, t: int) -> float:
    number = float(value)
    if not math.isfinite(number) or number > SUM_TOLERANCE:
        raise AnswerError(f"position {t} has log-probability {value!r}")
    return number


def _top(entries: dict[int, float], top_k: int, extra: int, t: int) -> tuple[list[int], list[float]]:
    """The K kept ``(ids, log p)``, descending, leaving out ``extra`` when it is the (K+1)-th entry."""
    if len(entries) == top_k + 1 and extra in entries:
        entries = {token: value for token, value in entries.items() if token != extra}
    if len(entries) != top_k:
        raise AnswerError(f"position {t} has {len(entries)} log-probabilities where top_k={top_k} asked for")
    ranked = sorted(entries.items(), key=lambda item: -item[1])
    return [token for token, _ in ranked], [value for _, value in ranked]


def _tail(log_probs: np.ndarray, vocab_size: int) -> np.ndarray:
    """``(T,)`` log(1 − Σ_K p) in float64, floored at LOG_FLOOR; −inf when K = V."""
    if log_probs.shape[-1] >= vocab_size:
        return np.full(log_probs.shape[:-1], -np.inf)
    kept = np.exp(log_probs).sum(-1)  # (T,)
    over = np.flatnonzero(kept > 1.0 + SUM_TOLERANCE)
    if over.size:
        t = int(over[0])
        raise AnswerError(f"position {t}: the K probabilities sum to {kept[t]:.6f} > 1")
    rest = 1.0 - kept
    floor = math.exp(LOG_FLOOR)
    return np.where(rest > floor, np.log(np.maximum(rest, floor)), LOG_FLOOR)


# --------------------------------------------------------------------------------------------- refusals
def refusal(url: str, model: str, status: int, message: str, prompt_length: int | None) -> ConfigError:
    """The ConfigError for a request the server at ``url`` refused (4xx, ``message`` from
    :func:`error_message`): K above its limit, an unknown model, a block longer than its context, ids
    outside its vocabulary, or anything else it said."""
    limit = LIMIT_MESSAGE.search(message)
    if limit:
        return ConfigError(
            "teacher.top_k",
            int(limit.group(1)),
            f"is above the {limit.group(2)} log-probabilities per position that {url} allows",
            f"start the server with --max-logprobs {limit.group(1)} (or more), or lower teacher.top_k",
        )
    if status == 404 and "model" in message:
        return ConfigError("teacher.model", model, f"is refused by {url}: {message}", MODEL_FIX)
    if "max_tokens must be at least 1" in message or "maximum context length" in message:
        return ConfigError(
            "data.block_size",
            prompt_length,
            f"is too long for the context of {url} ({message})",
            "start the server with a larger --max-model-len (block size + 1), or shorten the blocks",
        )
    if "out of vocabulary" in message:
        return ConfigError("teacher.server", url, f"refused a block: {message}", TOKENIZER_FIX)
    return ConfigError(
        "teacher.server",
        url,
        f"refused the request (HTTP {status}: {message})",
        "see the server's log",
    )
