"""CUDA graphs of the decoder for small calls without autograd (a forward of a few tokens), issue 14.

A tiny forward of a 1B model is host-bound: 2.6 ms of GPU kernels against ~18 ms of wall, ~1.1 ms of host time
per compiled decoder layer (dynamo's guards, the AOT wrappers, one Python launch per generated kernel and per
GEMM). Replaying a captured graph launches every kernel of the decoder at once, so such a call costs its GPU time.

- Only calls without autograd (forward-only, and the logprob pass of a request split into micro-batches) of at most
  `max_tokens` tokens: larger batches are GPU-bound, and a training forward must build its autograd graph.
- Such calls run `decode` (the backend gives it an explicit causal mask, see HfPeftBackend._hidden) whether or not
  they have a graph yet. Why the explicit mask: without one, transformers checks the position ids for packed
  sequences with a host sync, which it skips while a stream is capturing, and then hands the layers a mask tensor
  instead of None; the compiled layers saw a new input and recompiled inside the capture (which inductor cannot
  do). With the mask given, the layers see the same inputs in and out of a capture.
- One graph per (adapter slot, batch shape), captured the second time that key is seen (the first call runs
  uncaptured and compiles what it needs; the capture runs with recompiles forbidden), at most `max_graphs` kept:
  once they are all taken, a key displaces the least recently used graph only after more calls than that graph
  had replays.
- A capture is checked against an uncaptured run of the same call, bit for bit, before it is used; any difference or
  any capture failure turns graphs off for the backend (logged once) and calls run the ordinary way.
- A graph reads the adapter's weights where they were at capture: the optimizers update them in place; the
  pointers are checked at each replay anyway, and a removed adapter's graphs are dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (adapter slot, batch, length)
Decode = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, L] on the device -> hidden [B, L, H]


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # the graph's input buffer
    hidden: torch.Tensor  # the graph's output buffer, overwritten by each replay
    pointers: tuple[int, ...]  # the adapter tensors' addresses the graph reads
    replays: int = 0


class GraphPlan:
    """Which keys get a graph, and which graphs are kept: the device-free part."""

    def __init__(self, max_tokens: int = 256, max_graphs: int = 16, capture_on: int = 2):
        if max_tokens < 1 or max_graphs < 1 or capture_on < 1:
            raise ValueError(f"max_tokens ({max_tokens}), max_graphs ({max_graphs}) and capture_on ({capture_on}) "
                             "must be at least 1")
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.capture_on = capture_on
        self.enabled = True
        self.graphs: OrderedDict[Key, _Captured] = OrderedDict()
        self._seen: dict[Key, int] = {}

    def lookup(self, key: Key) -> _Captured | None:
        captured = self.graphs.get(key)
        if captured is not None:
            self.graphs.move_to_end(key)
            captured.replays += 1
        return captured

    def fits(self, key: Key) -> bool:
        """Whether calls of `key` go through `decode` and may get a graph."""
        _, batch, length = key
        return self.enabled and batch * length <= self.max_tokens

    def wants(self, key: Key) -> bool:
        """Count one more call of `key` (which fits and has no graph); whether to capture it now. With every graph
        slot taken, only a key called more often than the least recently used graph was replayed displaces it:
        calls cycling through more shapes than slots would otherwise capture (three decoder runs) on every other
        call."""
        self._seen[key] = seen = self._seen.get(key, 0) + 1
        if seen < self.capture_on:
            return False
        if len(self.graphs) < self.max_graphs:
            return True
        return seen > next(iter(self.graphs.values())).replays

    def keep(self, key: Key, captured: _Captured) -> None:
        self.graphs[key] = captured
        self._seen.pop(key, None)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def forget(self, slot: str) -> None:
        """Drop the graphs and counts of an adapter slot (removed: its weights' memory may be reused)."""
        for key in [k for k in self.graphs if k[0] == slot]:
            del self.graphs[key]
        for key in [k for k in self._seen if k[0] == slot]:
            del self._seen[key]

    def disable(self, why: str) -> None:
        if self.enabled:
            log.warning("decoder CUDA graphs off for this trainer: %s", why)
        self.enabled = False
        self.graphs.clear()
        self._seen.clear()


def pointers(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


class DecoderGraphs:
    """Runs `decode` for small calls without autograd, through a CUDA graph once the plan has one."""

    def __init__(self, plan: GraphPlan | None = None):
        self.plan = plan or GraphPlan()

    def run(self, slot: str, input_ids: torch.Tensor, weights: Sequence[torch.Tensor],
            decode: Decode) -> torch.Tensor | None:
        """Hidden states for device `input_ids` [B, L], or None when this call is not one for `decode` (too big,
        autograd on, graphs off). A graph's result lives in its buffer until the graph's next replay: use it before
        the next call."""
        key = (slot, int(input_ids.shape[0]), int(input_ids.shape[1]))
        if torch.is_grad_enabled() or not self.plan.fits(key):
            return None
        captured = self.plan.lookup(key)
        if captured is not None and captured.pointers != pointers(weights):
            self.plan.forget(slot)  # the adapter's tensors moved: its graphs read stale memory
            captured = None
        if captured is not None:
            captured.input_ids.copy_(input_ids, non_blocking=True)
            captured.graph.replay()
            return captured.hidden
        if not self.plan.wants(key):
            return decode(input_ids)
        try:
            captured, reference = _capture(input_ids, weights, decode)
        except Exception as exc:  # a sync inside the decoder, a recompile, an allocator refusal: never fail the call
            self.plan.disable(f"capturing {key} failed: {exc!r}")
            return None
        if not torch.equal(captured.hidden, reference):
            self.plan.disable(f"the graph of {key} did not reproduce the uncaptured decoder bit for bit")
            return reference
        self.plan.keep(key, captured)
        return captured.hidden


def _capture(input_ids: torch.Tensor, weights: Sequence[torch.Tensor],
             decode: Decode) -> tuple[_Captured, torch.Tensor]:
    """A graph of `decode` on a copy of device `input_ids`, replayed once, and an uncaptured run to check it with."""
    device = input_ids.device
    static_ids = input_ids.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):  # captures need a stream of their own
        reference = decode(static_ids).clone()  # the warm-up torch.cuda.graph asks for, and the check's reference
        # capture_begin/end, not the torch.cuda.graph context: that one first empties the device's and the
        # page-locked host memory caches, throwing away the snapshot buffers reserved at adapter creation
        # (host_copy.reserve_host) and making the next training step allocate afresh. thread_local: the trainer's
        # I/O threads may page-lock memory for a snapshot meanwhile, which a global-mode capture would refuse.
        # fail_on_recompile: a compile cannot run inside a capture; raise at once instead of half-compiling.
        with torch.compiler.set_stance("fail_on_recompile"):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                hidden = decode(static_ids)
            except BaseException:
                with contextlib.suppress(Exception):  # the capture is broken anyway; keep the decoder's error
                    graph.capture_end()
                raise
            graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(side)
    graph.replay()
    return _Captured(graph, static_ids, hidden, pointers(weights)), reference
