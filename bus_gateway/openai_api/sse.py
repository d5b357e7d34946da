"""`stream: true`: server-sent events fed by the sampler's sample_delta events as they arrive, then completed
from the result (which alone is authoritative: a missed or late delta only delays text), then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar.exceptions import HTTPException

from bus_events import payloads as p
from bus_gateway.futures import Future
from bus_gateway.gateway import Gateway
from bus_gateway.openai_api.errors import error_body
from bus_gateway.openai_api.generation import choices, raise_failure
from bus_gateway.openai_api.shapes import Shape
from bus_gateway.openai_api.text import TextStream

DONE = b"data: [DONE]\n\n"


def event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


async def stream(gw: Gateway, shape: Shape, fut: Future, deltas: asyncio.Queue[p.SampleDelta],
                 include_usage: bool) -> AsyncIterator[bytes]:
    """The events of one streamed request (one prompt, `n` choices). `deltas` is its subscription, taken before
    the first await after publishing (so no delta can come first); dropped however the client leaves."""
    gen = shape.gen
    try:
        texts = [TextStream(gen.tokenizer, gen.stops) for _ in range(gen.n)]
        for index in range(gen.n):
            opening = shape.opening(index)
            if opening is not None:
                yield event(opening)
        try:
            async with asyncio.timeout(gw.config.sync_sample_timeout_s):
                while (delta := await _next(deltas, fut)) is not None:
                    for piece in delta.sequences:
                        if 0 <= piece.index < gen.n and texts[piece.index].extend(piece.start, piece.tokens,
                                                                                  piece.logprobs):
                            chunk = _chunk(shape, piece.index, texts[piece.index])
                            if chunk is not None:
                                yield event(chunk)
        except TimeoutError:
            yield event(error_body(504, f"the sampler did not answer within {gw.config.sync_sample_timeout_s:g} s"))
            return
        try:
            raise_failure(fut)
        except HTTPException as exc:
            yield event(error_body(exc.status_code, exc.detail))
            return
        final = choices(gen, [fut])
        for choice in final:
            text = texts[choice.index]
            text.extend(0, choice.tokens, choice.logprobs)
            rest = text.piece(final=True)
            tokens, logprobs = text.new_logprobs()
            if rest or (shape.logprobs and tokens):
                yield event(shape.chunk(choice.index, rest, tokens, logprobs))
            yield event(shape.chunk(choice.index, "", finish_reason=choice.finish_reason))
        if include_usage:
            yield event(shape.usage_chunk(sum(len(c.tokens) for c in final)))
        yield DONE
    finally:
        gw.deltas.unsubscribe(fut.request_id)


async def _next(deltas: asyncio.Queue[p.SampleDelta], fut: Future) -> p.SampleDelta | None:
    """The next delta, or None once the result is in and no delta read before it is left (a delta and the result
    may come in one fetch: the delta still makes its own chunk)."""
    if not deltas.empty():
        return deltas.get_nowait()
    if fut.done.is_set():
        return None
    getter = asyncio.ensure_future(deltas.get())
    done = asyncio.ensure_future(fut.done.wait())
    try:
        await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (getter, done):
            task.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None


def _chunk(shape: Shape, index: int, text: TextStream) -> dict[str, Any] | None:
    piece = text.piece()
    if not (piece or shape.logprobs):
        return None
    tokens, logprobs = text.new_logprobs()
    return shape.chunk(index, piece, tokens, logprobs) if piece or tokens else None
