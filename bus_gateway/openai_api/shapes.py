"""The response bodies of the two endpoints, whole (`response`) and streamed (`chunk`): OpenAI's
chat.completion / chat.completion.chunk and text_completion shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bus_gateway.openai_api.generation import Choice, Generation, usage


def _token_texts(tokenizer: Any, tokens: Sequence[int]) -> list[str]:
    return [tokenizer.decode([token]) for token in tokens]


class Shape:
    id_prefix: str
    whole: str  # `object` of a whole response
    piece: str  # `object` of a streamed chunk

    def __init__(self, gen: Generation, request_id: str, logprobs: bool) -> None:
        self.gen, self.logprobs = gen, logprobs
        self.id = f"{self.id_prefix}{request_id}"

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.gen.created, "model": self.gen.model,
                "system_fingerprint": None, "choices": choices}

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        body = self._envelope(self.whole, [self.whole_choice(c) for c in choices])
        body["usage"] = usage(self.gen, sum(len(c.tokens) for c in choices))
        return body

    def chunk(self, index: int, text: str, tokens: Sequence[int] = (), logprobs: Sequence[float] = (),
              finish_reason: str | None = None) -> dict[str, Any]:
        lp = self.logprob_block(tokens, logprobs) if self.logprobs and tokens else None
        return self._envelope(self.piece, [self.chunk_choice(index, text, lp, finish_reason)])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope(self.piece, [])
        body["usage"] = usage(self.gen, completion_tokens)
        return body

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def whole_choice(self, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choice(self, index: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def logprob_block(self, tokens: Sequence[int], logprobs: Sequence[float]) -> Any:
        raise NotImplementedError


class ChatShape(Shape):
    id_prefix, whole, piece = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def logprob_block(self, tokens: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
        texts = _token_texts(self.gen.tokenizer, tokens)
        return {"content": [{"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
                            for text, lp in zip(texts, logprobs, strict=True)]}

    def whole_choice(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self.logprob_block(choice.tokens, choice.logprobs) if self.logprobs else None,
                "finish_reason": choice.finish_reason}

    def chunk_choice(self, index: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text or finish_reason is None else {},
                "logprobs": logprobs, "finish_reason": finish_reason}

    def opening(self, index: int) -> dict[str, Any]:
        return self._envelope(self.piece, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}])


class CompletionShape(Shape):
    id_prefix, whole, piece = "cmpl-", "text_completion", "text_completion"

    def logprob_block(self, tokens: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
        texts = _token_texts(self.gen.tokenizer, tokens)
        offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def whole_choice(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index, "text": choice.text,
                "logprobs": self.logprob_block(choice.tokens, choice.logprobs) if self.logprobs else None,
                "finish_reason": choice.finish_reason}

    def chunk_choice(self, index: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
