"""Runs one scheduled step on the device: the prefills, the decode of the running rows, then per-row sampling.

On CUDA the decode forward is captured once per batch-size bucket (and LoRA on/off) into a CUDA graph over fixed
input buffers: tokens, positions, cache slots, block tables, lengths and the LoRA tiles are copied in, the graph
replays. The graph depends on neither the adapters in the batch (they are slot indices in the tiles) nor on the
rows' lengths (the attention kernel reads them), so nothing is ever recompiled. Padding rows of a bucket write
to the scratch page and are never read. Elsewhere (CPU) the same forward runs eagerly at the exact batch size.

Nothing here waits for the device: host arrays go up through page-locked staging copies queued on the stream (a
plain copy from pageable memory would synchronise it), a row's next input token stays on the device (`next_token`,
by row slot), and a step's sampled tokens come back through copies queued behind it (`PendingStep`), so the
engine can plan and launch the next step while this one runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from bus_events.payloads import TOPK_PAD_ID, TOPK_PAD_LOGPROB
from sampler_consumer.kv_pages import SCRATCH_PAGE
from sampler_consumer.lora import LoraPlan
from sampler_consumer.models import BaseModel
from sampler_consumer.paged_model import DecodeMeta, PagedModel, PrefillMeta
from sampler_consumer.prompt_extras import PromptExtras
from sampler_consumer.requests import GenOutput
from sampler_consumer.sampling import sample_rows, top_logprobs
from sampler_consumer.scheduler import PrefillItem, SampledStep, Scheduler, StepPlan, TopkRows

log = logging.getLogger(__name__)


def bucket_of(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


@dataclass
class PendingStep:
    """A launched step's sampled tokens, logprobs and top-k rows, copied to the host behind the step's work;
    `wait` is the step's one host sync."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    topk: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None  # (positions in plan.sample, ids, logprobs)
    ready: torch.cuda.Event | None

    def wait(self) -> SampledStep:
        if self.ready is not None:
            self.ready.synchronize()
        topk = None
        if self.topk is not None:
            positions, ids, logprobs = self.topk
            topk = TopkRows(positions, ids.numpy(), logprobs.numpy())
        return SampledStep(self.tokens.numpy(), self.logprobs.numpy(), topk)


class Executor:
    def __init__(self, base: BaseModel, model: PagedModel, *, max_rows: int, max_pages_per_row: int,
                 graphs: bool, kernels: bool, prompt_logprob_chunk: int) -> None:
        self.base, self.model = base, model
        self.device = base.device
        self.kernels, self.graphs = kernels, graphs
        self.prompt_logprob_chunk = prompt_logprob_chunk
        self.bank = base.lora
        self.bank.current.kernels = kernels
        self.max_rows = bucket_of(max_rows)
        self.tokens = torch.zeros(self.max_rows, device=self.device, dtype=torch.long)
        self.positions = torch.zeros(self.max_rows, device=self.device, dtype=torch.long)
        self.slots = torch.zeros(self.max_rows, device=self.device, dtype=torch.long)
        self.block_table = torch.zeros(self.max_rows, max_pages_per_row, device=self.device, dtype=torch.int32)
        self.seq_lens = torch.ones(self.max_rows, device=self.device, dtype=torch.int32)
        self.next_token = torch.zeros(self.max_rows, device=self.device, dtype=torch.long)  # by row slot
        self._cuda = self.device.type == "cuda"
        self._tiles: dict[int, torch.Tensor] = {}
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

    # ------------------------------------------------------------------ host <-> device without a sync
    def _staged(self, array: np.ndarray) -> torch.Tensor:
        """`array` as a host tensor a non-blocking copy may read later: page-locked on CUDA (torch's caching host
        allocator keeps the block until the copy that reads it has run), the array itself elsewhere."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        return host.pin_memory() if self._cuda else host

    def upload(self, array: np.ndarray) -> torch.Tensor:
        return self._staged(array).to(self.device, non_blocking=True)

    def _fill(self, buffer: torch.Tensor, array: np.ndarray) -> None:
        buffer.copy_(self._staged(array), non_blocking=True)

    def _download(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._cuda)
        return host.copy_(tensor, non_blocking=True)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]) -> tuple[torch.Tensor, list[GenOutput | None]]:
        """Float logits of each item's last prompt position [len(items), V], and its prompt logprobs if asked."""
        logits: list[torch.Tensor | None] = [None] * len(items)
        outputs: list[GenOutput | None] = [None] * len(items)
        for batch in _length_batches(items):
            batch_logits, batch_outputs = self._prefill_batch([items[i] for i in batch])
            for j, i in enumerate(batch):
                logits[i], outputs[i] = batch_logits[j], batch_outputs[j]
        return torch.stack(logits), outputs  # type: ignore[arg-type]

    def _prefill_batch(self, batch: list[PrefillItem]) -> tuple[torch.Tensor, list[GenOutput | None]]:
        rows, width = len(batch), max(item.new_tokens for item in batch)
        page_size = self.model.page_size
        tokens = np.zeros((rows, width), dtype=np.int64)
        positions = np.zeros((rows, width), dtype=np.int64)
        slots = np.full((rows, width), SCRATCH_PAGE * page_size, dtype=np.int64)
        table = np.full((rows, max(len(item.pages) for item in batch)), SCRATCH_PAGE, dtype=np.int32)
        for i, item in enumerate(batch):
            new = np.arange(item.start, len(item.prompt))
            pages = np.asarray(item.pages, dtype=np.int64)
            tokens[i, :len(new)] = item.prompt[item.start:]
            positions[i, :len(new)] = new
            slots[i, :len(new)] = pages[new // page_size] * page_size + new % page_size
            table[i, :len(pages)] = pages
        up = self.upload
        meta = PrefillMeta(up(table), up(np.array([item.start for item in batch], dtype=np.int64)),
                           up(np.array([len(item.prompt) for item in batch], dtype=np.int64)))
        self._plan([(i * width, i * width + item.new_tokens, item.adapter_slot) for i, item in enumerate(batch)])
        try:
            hidden = self.model.forward(up(tokens), up(positions), up(slots).view(-1), meta)
            last = hidden[torch.arange(rows, device=self.device),
                          up(np.array([item.new_tokens - 1 for item in batch], dtype=np.int64))]
            self._plan([(i, i + 1, item.adapter_slot) for i, item in enumerate(batch)])
            logits = self.model.head(last).float()
            outputs = [self._prompt_outputs(item, hidden[i]) if item.full_prompt else None
                       for i, item in enumerate(batch)]
        finally:
            self.bank.plan(None)
        return logits, outputs

    def _plan(self, segments: list[tuple[int, int, int]]) -> None:
        tiles = None
        if self.kernels and any(slot for _, _, slot in segments):
            from sampler_consumer.lora_kernels import build_tiles

            tiles = self.upload(np.array(build_tiles(segments), dtype=np.int32))
        self.bank.plan(LoraPlan(segments, tiles))

    def _prompt_outputs(self, item: PrefillItem, hidden: torch.Tensor) -> GenOutput:
        """log p(prompt[t] | prompt[:t]) for t >= 1 and the top-k alternatives (the most any group asked),
        NaN / padding at t = 0, and a lone group's own extras (prompt_extras.PromptExtras); lm_head runs over
        chunks of positions, never [prompt, vocab] at once."""
        k = max(group.request.topk_prompt_logprobs for group in item.groups)
        n = len(item.prompt)
        logprobs = np.full(n, math.nan, dtype=np.float32)
        topk_ids = np.full((n, k), TOPK_PAD_ID, dtype=np.int32)
        topk_lps = np.full((n, k), TOPK_PAD_LOGPROB, dtype=np.float32)
        extras = PromptExtras.of(item.groups[0].request, self.device)  # such a group is its item's only one
        targets = self.upload(np.array(item.prompt[1:], dtype=np.int64))
        for c0 in range(0, n - 1, self.prompt_logprob_chunk):
            c1 = min(n - 1, c0 + self.prompt_logprob_chunk)
            self._plan([(0, c1 - c0, item.adapter_slot)])
            chunk = torch.log_softmax(self.model.head(hidden[c0:c1]).float(), dim=-1)
            logprobs[1 + c0:1 + c1] = chunk.gather(1, targets[c0:c1, None])[:, 0].cpu().numpy()
            if k:
                values, ids = chunk.topk(k, dim=-1)
                topk_ids[1 + c0:1 + c1] = ids.cpu().numpy()
                topk_lps[1 + c0:1 + c1] = values.cpu().numpy()
            if extras is not None:
                extras.add_chunk(chunk, c0)
        out = GenOutput(sequences=[], prompt_logprobs=logprobs, topk_ids=topk_ids if k else None,
                        topk_logprobs=topk_lps if k else None)
        if extras is not None:
            extras.fill(out)
        return out

    @torch.inference_mode()
    def decode(self, scheduler: Scheduler, plan: StepPlan) -> torch.Tensor:
        slots, lengths = plan.decode, plan.decode_positions
        rows = len(slots)
        bucket = bucket_of(rows) if self.graphs else rows
        # Each row's input is the token its previous step sampled, still on the device (it may not have run yet).
        torch.index_select(self.next_token, 0, self.upload(slots), out=self.tokens[:rows])
        self._fill(self.positions[:rows], lengths)
        page_size = scheduler.page_size
        # Only the pages in use travel: entries past a row's length are never read (the kernel stops there).
        width = int(lengths.max()) // page_size + 1
        tables = scheduler.block_table[slots, :width]
        cache_slots = tables[np.arange(rows), lengths // page_size].astype(np.int64) * page_size + lengths % page_size
        self._fill(self.slots[:rows], cache_slots)
        self._fill(self.block_table[:rows, :width], tables)
        self._fill(self.seq_lens[:rows], (lengths + 1).astype(np.int32))
        if bucket > rows:  # padding rows: scratch page, length 1
            self.tokens[rows:bucket] = 0
            self.positions[rows:bucket] = 0
            self.slots[rows:bucket] = SCRATCH_PAGE * page_size
            self.block_table[rows:bucket] = SCRATCH_PAGE
            self.seq_lens[rows:bucket] = 1
        segments = _segments(scheduler.adapter_slot[slots])
        lora = any(slot for _, _, slot in segments)
        if self.kernels and lora:
            from sampler_consumer.lora_kernels import build_tiles

            tiles = self._tiles_for(bucket)
            self._fill(tiles, np.array(build_tiles(segments, tiles.shape[1]), dtype=np.int32))
        if not self.graphs:
            # Eager: the block table only as wide as the longest row needs (a graph keeps the full width).
            self.bank.plan(LoraPlan(segments, self._tiles.get(bucket)) if lora else None)
            try:
                return self._decode_forward(bucket, width)
            finally:
                self.bank.plan(None)
        graph = self._graphs.get((bucket, lora)) or self._capture(bucket, lora)
        graph.graph.replay()
        return graph.logits[:rows]

    def _tiles_for(self, bucket: int) -> torch.Tensor:
        if bucket not in self._tiles:
            from sampler_consumer.lora_kernels import max_tiles

            self._tiles[bucket] = torch.zeros(3, max_tiles(bucket, self.bank.slots), device=self.device,
                                              dtype=torch.int32)
        return self._tiles[bucket]

    def _decode_forward(self, bucket: int, width: int | None = None) -> torch.Tensor:
        meta = DecodeMeta(self.block_table[:bucket, :width], self.seq_lens[:bucket])
        hidden = self.model.forward(self.tokens[:bucket], self.positions[:bucket], self.slots[:bucket], meta)
        return self.model.head(hidden)

    def _capture(self, bucket: int, lora: bool) -> _Graph:
        log.info("capturing the decode step for %d rows (LoRA %s) into a CUDA graph", bucket, "on" if lora else "off")
        plan = LoraPlan([(0, bucket, 1)], self._tiles_for(bucket)) if lora else None
        saved = self._tiles_for(bucket).clone()
        self._tiles[bucket].zero_()  # warm-up runs with empty tiles: the kernels compile, nothing is added
        self.bank.plan(plan)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._decode_forward(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._decode_forward(bucket)
        finally:
            self.bank.plan(None)
            self._tiles[bucket].copy_(saved)
        self._graphs[(bucket, lora)] = _Graph(graph, logits)
        return self._graphs[(bucket, lora)]

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            self.model.copy_pages(self.upload(np.array([s for s, _ in pairs], dtype=np.int64)),
                                  self.upload(np.array([d for _, d in pairs], dtype=np.int64)))

    @torch.inference_mode()
    def sample(self, scheduler: Scheduler, plan: StepPlan, logits: torch.Tensor) -> PendingStep:
        """Queue the sampling of `plan.sample`'s rows (their next inputs stay on the device) and the copies of
        the results to the host; nothing waits here."""
        slots = np.array([row.slot for row in plan.sample], dtype=np.int64)
        temperature = scheduler.temperature[slots]
        top_k, top_p = scheduler.top_k[slots], scheduler.top_p[slots]
        random = temperature > 0
        truncating = random & ((top_k > 0) | (top_p < 1))
        up = self.upload

        def index(mask: np.ndarray) -> torch.Tensor | None:
            return up(np.flatnonzero(mask)) if mask.any() else None

        tokens, logprobs = sample_rows(
            logits, up(np.where(random, temperature, 1.0).astype(np.float32)), up(top_k), up(top_p),
            up(scheduler.seed[slots]), up(plan.sample_steps), index(truncating), index(random & ~truncating),
            fused=self.kernels)
        self.next_token.index_copy_(0, up(slots), tokens)
        topk = None
        wanted = scheduler.topk_sample[slots]
        if wanted.any():  # opt-in per request: only its rows, one extra small copy to the host
            positions = np.flatnonzero(wanted)
            ids, values = top_logprobs(logits.index_select(0, up(positions)), int(wanted.max()))
            topk = (positions, self._download(ids.to(torch.int32)), self._download(values))
        tokens_host, logprobs_host = self._download(tokens), self._download(logprobs)
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record()
        return PendingStep(tokens_host, logprobs_host, topk, ready)


def _segments(adapter_slots: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal adapter slots (the scheduler sorts decode rows by slot)."""
    segments, start = [], 0
    for i in range(1, len(adapter_slots) + 1):
        if i == len(adapter_slots) or adapter_slots[i] != adapter_slots[start]:
            segments.append((start, i, int(adapter_slots[start])))
            start = i
    return segments


def _length_batches(items: list[PrefillItem]) -> list[list[int]]:
    """Item indices in batches of similar new-token counts (each batch is padded to its longest)."""
    order = sorted(range(len(items)), key=lambda i: items[i].new_tokens)
    batches: list[list[int]] = []
    for i in order:
        if batches and items[i].new_tokens <= 2 * items[batches[-1][0]].new_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
