"""Per-token target logprobs from a megatron GPTModel: decoder once, then the unembedding in position chunks.

Like the HF backend (backends/logprobs.py) the fp32 [T, V] logits never exist at once: each chunk's logits are
made, reduced to log p(target) and, with gradients on, recomputed in backward (checkpointed). Under TP the
logits of a chunk are vocabulary-sharded, so log-softmax is done across ranks: a max all-reduce (no gradient
needed: it only stabilises), then the sum of exp and the target logit through reduce_from_tensor_model_parallel_
region, whose backward is the identity, which makes the gradient exactly onehot - softmax on every shard.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from trainer_consumer.backends.batch import MicroBatch
from trainer_consumer.backends.megatron.parallel import device, tp_rank, tp_size

# A megatron-core GPTModel (megatron-core is an optional extra and ships no type information).
GPTModel = Any


def decoder_hidden_states(model: GPTModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [s, b, h] for right-padded input_ids [b, s] (causal: padding never leaks left)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # With post_process off, GPTModel returns the decoder output (final norm applied) without the unembedding.
    # No mask tensor: the core attention (attention.py) is causal by construction.
    model.post_process = False
    try:
        return model(input_ids, positions, None)
    finally:
        model.post_process = True


def checkpoint_layers(model: GPTModel) -> None:
    """Activation checkpointing per transformer layer with torch's non-reentrant checkpoint: megatron's own
    recompute saves CUDA RNG states and so cannot run on CPU. Recompute repeats a layer's TP collectives in
    backward, in the same order on every rank, and its LoRA hooks, which are deterministic."""
    for layer in model.decoder.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def _vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log_softmax(logits)[i, targets[i]] for logits [n, V_local] holding this rank's vocabulary slice."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    local_vocab = logits.shape[-1]
    start = tp_rank() * local_vocab
    if start + local_vocab > vocab_size:  # megatron's vocabulary padding: those rows are not tokens
        padded = torch.arange(start, start + local_vocab, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    shift = logits.detach().max(dim=-1).values
    if tp_size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - shift.unsqueeze(-1)
    sum_exp = reduce_from_tensor_model_parallel_region(shifted.exp().sum(dim=-1))
    local_index = targets - start
    owned = (local_index >= 0) & (local_index < local_vocab)
    picked = shifted.gather(-1, local_index.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = reduce_from_tensor_model_parallel_region(torch.where(owned, picked, torch.zeros_like(picked)))
    return target_logit - sum_exp.log()


def _chunk_logprobs(model: GPTModel, hidden: torch.Tensor, targets: torch.Tensor,
                    vocab_size: int) -> torch.Tensor:
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden.unsqueeze(1), weight=weight)  # megatron linears expect [s, b, h]
    return _vocab_parallel_logprobs(logits.squeeze(1), targets, vocab_size)


def target_logprobs(model: GPTModel, batch: MicroBatch, vocab_size: int, chunk_tokens: int) -> torch.Tensor:
    """float32 [real positions of the batch, row-major]: log p(target) under whatever adapter is active."""
    here = device()
    mask = batch.mask.to(here)
    hidden = decoder_hidden_states(model, batch.input_ids.to(here)).transpose(0, 1)[mask]
    targets = batch.targets.to(here)[mask]
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, model, h, t, vocab_size, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(model, h, t, vocab_size))
    return torch.cat(pieces)
