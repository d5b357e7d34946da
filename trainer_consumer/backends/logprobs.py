"""log p(target) from hidden states without ever holding the full [T, V] fp32 logits.

With a 128k vocabulary, fp32 logits for a batch of T tokens are T * 512 KiB: 4 GiB at T = 8k, plus as much
again for log_softmax and its gradient. Instead the positions go through the unembedding in chunks; each chunk's
[chunk, V] logits live only inside that chunk, and with gradients the chunk is checkpointed, so the backward pass
recomputes one chunk's logits at a time instead of keeping all of them from the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

Unembed = Callable[[torch.Tensor], torch.Tensor]  # hidden [n, H] -> logits [n, V] (any float dtype)


def _chunk_logprobs(unembed: Unembed, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = unembed(hidden).float()
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - torch.logsumexp(logits, dim=-1)


def target_logprobs(unembed: Unembed, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """float32 [n]: log_softmax(unembed(hidden))[i, targets[i]] for hidden [n, H] and targets [n]."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.shape[0]} targets")
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
