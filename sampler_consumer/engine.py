"""The generation engine: one batched prefill over distinct prompts, then a KV-cached decode of every sample.

Each request brings its own prompt, adapter, SamplingParams, sample indices (for per-sample seeds) and stop
rule. Prompts are left-padded into one prefill; prompt logprobs come from the prefill's hidden states, in
chunks of positions so long prompts never materialise [T, vocab] at once. Rows are then repeated
num_samples times and decoded together; each row stops on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import DynamicCache

from bus_events import payloads as p
from sampler_consumer.decoding import DynamicDecoder, StaticCachePool, StaticDecoder
from sampler_consumer.lora import LoraAdapter
from sampler_consumer.models import BaseModel
from sampler_consumer.sampling import RowSampling, sample_next
from sampler_consumer.stops import StopChecker

TOPK_PAD_ID, TOPK_PAD_LOGPROB = 0, -99999.0  # tinker-protocol.md 3.2: a padding cell of TopkLogprobs


@dataclass
class GenRequest:
    prompt: list[int]
    params: p.SamplingParams
    adapter: LoraAdapter | None = None
    first_sample: int = 0  # index of this request's first sample (seeds are per sample index)
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: Literal["stop", "length"] = "length"


@dataclass
class GenOutput:
    sequences: list[Sequence]
    prompt_logprobs: np.ndarray | None = None  # float32 [P], NaN at 0
    topk_ids: np.ndarray | None = None  # int32 [P, k], row 0 padding
    topk_logprobs: np.ndarray | None = None  # float32 [P, k]


@dataclass
class _Row:
    request: int
    sampling: RowSampling
    stop: StopChecker
    max_tokens: int
    sequence: Sequence


class _HostCopy:
    """Device tensors copied to the host without stalling the stream: `wait` blocks only until the copy is done,
    not until work queued after it (the next decode step) finishes."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.event = None
        self.host = list(tensors)
        if tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> list[list]:
        if self.event is not None:
            self.event.synchronize()
        return [t.tolist() for t in self.host]


class Engine:
    def __init__(self, model: BaseModel, cache_mode: Literal["dynamic", "static"] = "dynamic",
                 compiled: bool = False, prompt_logprob_chunk: int = 256, compile_mode: str = "default") -> None:
        self.model = model
        self.cache_mode = cache_mode
        self.prompt_logprob_chunk = prompt_logprob_chunk
        self.static_pool = StaticCachePool(model, compiled, compile_mode) if cache_mode == "static" else None

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest]) -> list[GenOutput]:
        model = self.model
        device = model.device
        lengths = [len(r.prompt) for r in requests]
        width = max(lengths)
        input_ids = torch.zeros(len(requests), width, dtype=torch.long)
        attention = torch.zeros(len(requests), width, dtype=torch.bool)
        for i, r in enumerate(requests):
            input_ids[i, width - lengths[i]:] = torch.tensor(r.prompt)
            attention[i, width - lengths[i]:] = True
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.long().cumsum(1) - 1).clamp_(min=0)

        model.lora.activate([r.adapter for r in requests], pad_to_bucket=self.cache_mode == "static")
        cache = DynamicCache(config=model.model.config)
        hidden = model.model.base_model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                        past_key_values=cache, use_cache=True).last_hidden_state
        head = model.model.get_output_embeddings()
        last_logits = head(hidden[:, -1:]).float()[:, 0]
        outputs = [self._prompt_outputs(i, r, hidden, width) for i, r in enumerate(requests)]

        rows = [
            _Row(i, RowSampling.create(r.params, r.first_sample + s),
                 StopChecker(r.params.stop, model.eos_ids, model.decode), r.params.max_tokens, Sequence())
            for i, r in enumerate(requests) for s in range(r.num_samples)
        ]
        for row in rows:
            outputs[row.request].sequences.append(row.sequence)
        expand = torch.tensor([row.request for row in rows], device=device)
        cache.batch_select_indices(expand)
        model.lora.select_rows(expand)
        attention = attention.index_select(0, expand)
        next_positions = positions[:, -1].index_select(0, expand) + 1
        self._decode(rows, last_logits.index_select(0, expand), cache, attention, next_positions)
        return outputs

    def _decode(self, rows: list[_Row], logits: torch.Tensor, cache: DynamicCache, attention: torch.Tensor,
                positions: torch.Tensor) -> None:
        live = [i for i, row in enumerate(rows) if row.max_tokens > 0]
        if not live:
            return
        if self.static_pool is not None:
            longest = max(rows[i].max_tokens for i in live)
            decoder: DynamicDecoder | StaticDecoder = StaticDecoder(
                self.model, self.static_pool, cache, attention, positions, longest)
        else:
            decoder = DynamicDecoder(self.model, cache, attention, positions)
        logits = logits.index_select(0, torch.tensor(live, device=logits.device))
        while True:
            tokens, logprobs = sample_next(logits, [rows[i].sampling for i in live])
            on_host = _HostCopy(tokens, logprobs)
            # The next step starts before this step's tokens reach the host, so the host's stop checks overlap the
            # GPU's decoding; a row that turns out to have stopped costs one discarded step.
            going = [j for j, i in enumerate(live) if len(rows[i].sequence.tokens) + 1 < rows[i].max_tokens]
            next_logits = None
            if going:
                fed = tokens if len(going) == len(live) else tokens.index_select(
                    0, torch.tensor(going, device=tokens.device))
                next_logits = decoder.step(fed, [live[j] for j in going])
            still = []
            for i, token, logprob in zip(live, *on_host.wait(), strict=True):
                seq = rows[i].sequence
                seq.tokens.append(token)
                seq.logprobs.append(logprob)
                if rows[i].stop.stops(seq.tokens):
                    seq.stop_reason = "stop"
                elif len(seq.tokens) < rows[i].max_tokens:
                    still.append(i)
            if not still or next_logits is None:
                return
            if len(still) < len(going):
                where = {live[j]: k for k, j in enumerate(going)}
                next_logits = next_logits.index_select(
                    0, torch.tensor([where[i] for i in still], device=next_logits.device))
            logits, live = next_logits, still

    def _prompt_outputs(self, index: int, request: GenRequest, hidden: torch.Tensor, width: int) -> GenOutput:
        """log p(prompt[t] | prompt[:t]) for t >= 1 (and the top-k alternatives), NaN / padding at t = 0."""
        out = GenOutput(sequences=[])
        k = request.topk_prompt_logprobs
        if not (request.prompt_logprobs or k):
            return out
        n = len(request.prompt)
        logprobs = np.full(n, math.nan, dtype=np.float32)
        topk_ids = np.full((n, k), TOPK_PAD_ID, dtype=np.int32)
        topk_lps = np.full((n, k), TOPK_PAD_LOGPROB, dtype=np.float32)
        start = width - n  # first real column of this row (left padding)
        targets = torch.tensor(request.prompt[1:], device=hidden.device)
        head = self.model.model.get_output_embeddings()
        with self.model.lora.only_row(index):
            for c0 in range(0, n - 1, self.prompt_logprob_chunk):
                c1 = min(n - 1, c0 + self.prompt_logprob_chunk)
                chunk = torch.log_softmax(head(hidden[index:index + 1, start + c0:start + c1]).float()[0], dim=-1)
                logprobs[1 + c0:1 + c1] = chunk.gather(1, targets[c0:c1, None])[:, 0].cpu().numpy()
                if k:
                    values, ids = chunk.topk(k, dim=-1)
                    topk_ids[1 + c0:1 + c1] = ids.cpu().numpy()
                    topk_lps[1 + c0:1 + c1] = values.cpu().numpy()
        out.prompt_logprobs = logprobs if request.prompt_logprobs else None
        if k:
            out.topk_ids, out.topk_logprobs = topk_ids, topk_lps
        return out
