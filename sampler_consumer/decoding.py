"""KV-cached decode steps over a batch of rows, after a shared prefill.

`DynamicDecoder` (CPU): a growing DynamicCache; finished rows are dropped from the cache so they cost nothing.
`StaticDecoder` (GPU): a preallocated StaticCache of bucketed (rows, length) reused across batches, a fixed-shape
4D attention mask kept here (so the compiled step gets it ready-made instead of rebuilding it in every layer) and
a decode step that is torch.compile'd, by default into CUDA graphs (static shapes; finished rows keep decoding a
dummy token and are ignored). Both return the logits of the rows still generating.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from sampler_consumer.models import BaseModel

# Each (rows, length, adapters x rank) bucket is one compiled graph; allow many before dynamo gives up.
COMPILED_SHAPES_LIMIT = 64


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


class DynamicDecoder:
    def __init__(self, model: BaseModel, cache: DynamicCache, attention: torch.Tensor, positions: torch.Tensor) -> None:
        self.model = model
        self.cache = cache
        self.attention = attention  # [rows, seen] bool: False on left padding
        self.positions = positions  # [rows] position id of each row's next token
        self.rows = list(range(attention.shape[0]))

    def _keep(self, live: list[int]) -> None:
        if live == self.rows:
            return
        where = {row: i for i, row in enumerate(self.rows)}
        index = torch.tensor([where[r] for r in live], device=self.attention.device)
        self.cache.batch_select_indices(index)
        self.attention = self.attention.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.model.lora.select_rows(index)
        self.rows = list(live)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, live: list[int]) -> torch.Tensor:
        """Feed `tokens` (one per live row) and return the next logits [len(live), V] in float32."""
        self._keep(live)
        ones = torch.ones(len(live), 1, dtype=torch.bool, device=self.attention.device)
        self.attention = torch.cat([self.attention, ones], dim=1)
        out = self.model.model(input_ids=tokens.view(-1, 1), attention_mask=self.attention,
                               position_ids=self.positions.view(-1, 1), past_key_values=self.cache, use_cache=True,
                               logits_to_keep=1)
        self.positions = self.positions + 1
        return out.logits[:, -1].float()


class _Step(nn.Module):
    """model + cache -> next-token logits; the unit that gets compiled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: StaticCache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]


class StaticCachePool:
    """One StaticCache per base model, reallocated only when a batch needs more rows or length than it has."""

    def __init__(self, model: BaseModel, compiled: bool, compile_mode: str = "default") -> None:
        self.model = model
        self.cache: StaticCache | None = None
        self.shape = (0, 0)
        step = _Step(model.model)
        if compiled:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILED_SHAPES_LIMIT)
        self.step_fn = torch.compile(step, mode=compile_mode, dynamic=False) if compiled else step
        # CUDA graph replays reuse their output buffers; each step's logits are consumed before the next step.
        self.graphs = compiled and compile_mode in ("reduce-overhead", "max-autotune")

    def acquire(self, rows: int, length: int) -> tuple[StaticCache, int, int]:
        want_rows, want_len = _bucket(rows, 8), _bucket(length, 256)
        if self.cache is None or self.shape != (want_rows, want_len):
            self.cache = None  # free the old buffers before allocating new ones
            self.cache = StaticCache(config=self.model.model.config, max_cache_len=want_len)
            self.shape = (want_rows, want_len)
        else:
            self.cache.reset()
        return self.cache, want_rows, want_len


class StaticDecoder:
    def __init__(self, model: BaseModel, pool: StaticCachePool, prefill: DynamicCache, attention: torch.Tensor,
                 positions: torch.Tensor, max_new_tokens: int) -> None:
        rows, seen = attention.shape
        self.model, self.pool = model, pool
        self.cache, self.padded_rows, max_len = pool.acquire(rows, seen + max_new_tokens)
        device = attention.device
        # Padding rows replay row 0's prompt; their outputs are never read.
        source = torch.cat([torch.arange(rows, device=device),
                            torch.zeros(self.padded_rows - rows, dtype=torch.long, device=device)])
        for layer_idx, layer in enumerate(prefill.layers):
            self.cache.update(layer.keys.index_select(0, source), layer.values.index_select(0, source), layer_idx)
        # [rows, 1, 1, max_len]: the prompt's real positions, then each slot as the step that writes it begins.
        self.mask = torch.zeros(self.padded_rows, 1, 1, max_len, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :seen] = attention.index_select(0, source)
        self.next_slot = seen
        self.positions = positions.index_select(0, source).view(-1, 1).clone()
        self.tokens = torch.zeros(self.padded_rows, 1, dtype=torch.long, device=device)
        model.lora.pad_rows(self.padded_rows)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, live: list[int]) -> torch.Tensor:
        live_index = torch.tensor(live, device=self.tokens.device)
        self.tokens[live_index, 0] = tokens
        self.mask[:, :, :, self.next_slot] = True
        if self.pool.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.pool.step_fn(self.tokens, self.positions, self.mask, self.cache)
        self.positions += 1
        self.next_slot += 1
        return logits.index_select(0, live_index).float()
