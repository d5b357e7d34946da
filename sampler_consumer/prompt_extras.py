"""A request's own outputs at every prompt position after the first, built chunk by chunk from the log-probabilities
of the prompt pass (executor._prompt_outputs): `target_prompt_logprobs` (log p of the ids it names) and
`prompt_alt_tokens` (k draws at its temperature). Row i of both is prompt position i + 1, i.e. the prediction made
from hidden state i: a chunk of hidden states [c0, c1) fills rows [c0, c1).

They depend on the request alone (its ids, its seed), so the scheduler prefills such a request on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sampler_consumer.requests import GenOutput, GenRequest
from sampler_consumer.sampling import ALT_TOKENS_SAMPLE, draw_alternatives, sample_seed


@dataclass
class PromptExtras:
    targets: torch.Tensor | None  # int64 [P - 1, K] on the device, -1 = nothing asked
    target_logprobs: np.ndarray | None  # float32 [P - 1, K]
    alt_k: int
    temperature: float
    seed: int
    alt_tokens: np.ndarray  # int32 [P - 1, alt_k]
    alt_logprobs: np.ndarray  # float32 [P - 1, alt_k]

    @classmethod
    def of(cls, request: GenRequest, device: torch.device) -> PromptExtras | None:
        if not request.wants_prompt_extras:
            return None
        rows, ids = len(request.prompt) - 1, request.target_prompt_ids
        k = request.prompt_alt_tokens_k
        return cls(
            targets=None if ids is None else torch.from_numpy(np.array(ids, dtype=np.int64)).to(device),
            target_logprobs=None if ids is None else np.full(ids.shape, math.nan, dtype=np.float32),
            alt_k=k, temperature=request.params.temperature,
            seed=sample_seed(request.params.seed, ALT_TOKENS_SAMPLE),
            alt_tokens=np.zeros((rows, k), dtype=np.int32), alt_logprobs=np.zeros((rows, k), dtype=np.float32))

    def add_chunk(self, logprobs: torch.Tensor, first_row: int) -> None:
        """`logprobs` [C, V]: log_softmax of the logits of hidden states first_row .. first_row + C - 1."""
        rows = slice(first_row, first_row + logprobs.shape[0])
        if self.targets is not None and self.target_logprobs is not None:
            ids = self.targets[rows]
            scored = logprobs.gather(1, ids.clamp(min=0))
            self.target_logprobs[rows] = torch.where(ids >= 0, scored, math.nan).cpu().numpy()
        if self.alt_k:
            tokens = draw_alternatives(logprobs, self.alt_k, self.temperature, self.seed, first_row)
            self.alt_tokens[rows] = tokens.cpu().numpy()
            self.alt_logprobs[rows] = logprobs.gather(1, tokens).cpu().numpy()

    def fill(self, out: GenOutput) -> None:
        out.target_logprobs = self.target_logprobs
        if self.alt_k:
            out.alt_tokens, out.alt_logprobs = self.alt_tokens, self.alt_logprobs
