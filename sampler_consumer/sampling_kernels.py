"""One Triton kernel for the common sampling case (greedy, or temperature without top-k / top-p), on CUDA.

The torch path (sampling.sample_rows) makes ~10 passes over [rows, vocab] fp32 logits (a float copy, logsumexp,
argmax, a row gather, the temperature division, softmax, cumsum, the search); at 2,048 rows and a 128k vocabulary
that is ~12 GB of memory traffic a step. Here each row is one program that reads its logits twice in their own
dtype: pass 1 keeps the running max, the sums of exp at temperature 1 (for the logprob) and at the row's
temperature, and the argmax; pass 2 walks the cumulative sum at the row's temperature to the row's uniform draw
(the same inverse CDF as the torch path, unnormalised). Rows with top-k / top-p still take the torch path.
"""

from __future__ import annotations

import torch

from sampler_consumer.attention import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _sample_rows(logits_ptr, temperature_ptr, uniform_ptr, tokens_ptr, log_total_ptr, vocab, stride,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row * stride
        temperature = tl.load(temperature_ptr + row)
        inv_t = 1.0 / tl.where(temperature > 0, temperature, 1.0)
        cols = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)  # sum of exp(x - m)
        total_t = tl.zeros((), tl.float32)  # sum of exp((x - m) / T)
        best = tl.full((), float("-inf"), tl.float32)
        best_at = tl.zeros((), tl.int64)
        for v0 in range(0, vocab, BLOCK):
            ok = v0 + cols < vocab
            x = tl.load(base + v0 + cols, mask=ok, other=float("-inf")).to(tl.float32)
            block_max = tl.max(x, axis=0)
            block_best = tl.argmax(x, axis=0)
            if block_max > best:  # strictly: the first maximum wins, as torch's argmax
                best = block_max
                best_at = (v0 + block_best).to(tl.int64)
            m_new = tl.maximum(m, block_max)
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            total_t = total_t * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp((x - m_new) * inv_t), axis=0)
            m = m_new
        tl.store(log_total_ptr + row, m + tl.log(total))
        token = best_at
        if temperature > 0:
            target = tl.load(uniform_ptr + row).to(tl.float32) * total_t
            running = tl.zeros((), tl.float32)
            chosen = tl.full((), -1, tl.int64)
            for v0 in range(0, vocab, BLOCK):
                ok = v0 + cols < vocab
                x = tl.load(base + v0 + cols, mask=ok, other=float("-inf")).to(tl.float32)
                cdf = running + tl.cumsum(tl.exp((x - m) * inv_t), axis=0)
                past = (cdf > target) & ok
                first = tl.min(tl.where(past, v0 + cols, vocab), axis=0).to(tl.int64)
                if (chosen < 0) & (first < vocab):
                    chosen = first
                running = tl.max(tl.where(ok, cdf, 0.0), axis=0)
            token = tl.where(chosen < 0, vocab - 1, chosen)  # u * total rounded up to the total: the last token
        tl.store(tokens_ptr + row, token)


def sample_plain_rows(logits: torch.Tensor, temperature: torch.Tensor,
                      uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [R] int64, log_total [R] fp32 = logsumexp of each row) for logits [R, V]: the argmax where
    temperature is 0, else the inverse-CDF draw of uniforms[r] at temperature[r] (no truncation)."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    log_total = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _sample_rows[(rows,)](logits, temperature.float().contiguous(), uniforms.contiguous(), tokens, log_total,
                              vocab, logits.stride(0), BLOCK=min(4096, triton.next_power_of_2(vocab)), num_warps=8)
    return tokens, log_total
