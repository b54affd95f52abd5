"""Next-token choice per request: greedy rows in one argmax, sampled rows each with their own
seeded generator, so a request's tokens never depend on which others share its batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.engine.request import SamplingParams, TokenLogprob

# OpenAI's floor for a log-probability: what it reports for a token with probability 0, so a
# -inf logprob serialises as a number (JSON has no Inf or NaN).
LOGPROB_FLOOR = -9999.0


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one row of ``[V]`` logits (float32)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def fetch(logits: torch.Tensor, flags: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Each row's greedy token (``logits [N, V]``) and ``flags [C]``, in one device→host copy.

    The flags (the step's non-finite chunks) ride with the tokens sampling needs anyway, so
    checking them adds no synchronisation.
    """
    n = logits.shape[0]
    host = torch.cat([logits.argmax(-1), flags.long()]).tolist()  # [N + C]
    return host[:n], [bool(f) for f in host[n:]]


def sample(
    logits: torch.Tensor,  # [N, V]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    greedy: Sequence[int] | None = None,
) -> list[int]:
    """One token per row; ``greedy`` is each row's argmax when :func:`fetch` already has it."""
    tokens = list(greedy) if greedy is not None else logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filter(logits[i].float(), p).softmax(-1)
        # Exponential race (≡ multinomial): one draw per vocabulary entry from the row's own stream.
        noise = torch.empty_like(probs).exponential_(generator=generators[i])
        tokens[i] = int((probs / noise).argmax())
    return tokens


def logprobs_of(
    logits: torch.Tensor, tokens: Sequence[int], params: Sequence[SamplingParams]
) -> list[TokenLogprob | None]:
    """The model's log-probability of each chosen token, plus the top-k alternatives asked for."""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if not wanted:
        return out
    logp = torch.log_softmax(logits[wanted].float(), dim=-1)
    logp = logp.nan_to_num(LOGPROB_FLOOR, 0.0, LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)
    for row, i in enumerate(wanted):
        k = params[i].logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if k:
            values, ids = torch.topk(logp[row], k)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        out[i] = TokenLogprob(tokens[i], float(logp[row, tokens[i]]), top)
    return out
