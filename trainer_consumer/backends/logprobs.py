"""log p(target) from hidden states without ever holding the full [T, V] fp32 logits.

With a 128k vocabulary, fp32 logits for a batch of T tokens are T * 512 KiB: 4 GiB at T = 8k, plus as much
again for log_softmax and its gradient. Instead the positions go through the unembedding in chunks and each
chunk's [chunk, V] logits live only inside that chunk. Two ways to get gradients:

- `frozen_unembed_logprobs`, when the unembedding is a frozen matrix W (no LoRA on lm_head): d log p(y|h) / dh =
  W[y] - softmax(hW^T) W does not depend on the loss, so the forward pass stores that [T, H] direction per
  position and the backward pass only scales it. Two vocabulary-sized matmuls per chunk in all, as in a plain
  full-logits loss, and no logits kept.
- `target_logprobs`, for any unembedding (LoRA on lm_head needs the logits' gradient for its own weights): each
  chunk is checkpointed and recomputed in the backward pass, one more vocabulary-sized matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Unembed = Callable[[torch.Tensor], torch.Tensor]  # hidden [n, H] -> logits [n, V] (any float dtype)


def _check_lengths(hidden: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.shape[0]} targets")


def _logprobs_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Shaped like targets: [n] (one target per position) or [n, K] (K targets per position)."""
    logits = logits.float()
    columns = targets.reshape(targets.shape[0], -1)
    target_logits = logits.gather(-1, columns)
    return (target_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).reshape(targets.shape)


def _chunk_logprobs(unembed: Unembed, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _logprobs_of_logits(unembed(hidden), targets)


def target_logprobs(unembed: Unembed, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """float32 shaped like targets: log_softmax(unembed(hidden))[i, targets[i]] for hidden [n, H] and targets [n]
    or [n, K]."""
    _check_lengths(hidden, targets)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, unembed, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(unembed, h, t))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


LogprobMath = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logprob_and_direction(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) fp32 [n], onehot(target) - softmax in the logits' dtype [n, V]) for logits [n, V] and
    target [n, 1]: written as one pure expression so torch.compile fuses it into a pass or two over the logits."""
    full = logits.float()
    log_norm = torch.logsumexp(full, dim=-1, keepdim=True)
    logprob = (full.gather(1, target) - log_norm).squeeze(1)
    onehot = torch.arange(full.shape[1], device=full.device) == target
    return logprob, (onehot.float() - torch.exp(full - log_norm)).to(logits.dtype)


class _FrozenUnembedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int, math: LogprobMath | None) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        direction = torch.empty_like(hidden) if math is not None else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            target = targets[start:stop].unsqueeze(1)
            logits = F.linear(hidden[start:stop], weight)
            if direction is None:
                out[start:stop] = _logprobs_of_logits(logits, targets[start:stop])
                continue
            assert math is not None  # a direction is only kept when there is math to fill it
            out[start:stop], grad_logits = math(logits, target)
            direction[start:stop] = grad_logits @ weight
        ctx.save_for_backward(direction)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (direction,) = ctx.saved_tensors
        grad_hidden = (direction.float() * grad_out.unsqueeze(1)).to(direction.dtype)
        return grad_hidden, None, None, None, None


def frozen_unembed_logprobs(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                            math: LogprobMath = logprob_and_direction) -> torch.Tensor:
    """float32 [n]: log_softmax(hidden @ weight.T)[i, targets[i]], differentiable w.r.t. hidden only. `math` may be
    a torch.compile'd logprob_and_direction."""
    _check_lengths(hidden, targets)
    if weight.requires_grad:
        raise ValueError("frozen_unembed_logprobs needs a frozen unembedding; use target_logprobs")
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _FrozenUnembedLogprobs.apply(hidden, weight, targets, chunk_tokens, math if with_grad else None)
