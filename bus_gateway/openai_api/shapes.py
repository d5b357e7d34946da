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

    def _block(self, tokens: Sequence[int], logprobs: list[float | None],
               top: list[dict[str, float] | None] | None) -> dict[str, Any]:
        texts = _token_texts(self.gen.tokenizer, tokens)
        offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}

    def _sampled_top(self, tokens: Sequence[int], logprobs: Sequence[float]) -> list[dict[str, float] | None] | None:
        """Alternatives of generated tokens: only asked for where they are known (routes: greedy, logprobs=1),
        where the sampled token is the most likely one."""
        if not self.gen.top_logprobs:
            return None
        return [{text: lp} for text, lp in zip(_token_texts(self.gen.tokenizer, tokens), logprobs, strict=True)]

    def logprob_block(self, tokens: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
        return self._block(tokens, list(logprobs), self._sampled_top(tokens, logprobs))

    def _echo_block(self, choice: Choice) -> dict[str, Any]:
        echo = choice.echo
        assert echo is not None
        blank: list[None] = [None] * len(echo.tokens)
        top = None
        if self.gen.top_logprobs:
            top = [None if row is None else {self.gen.tokenizer.decode([t]): lp for t, lp in row}
                   for row in echo.top or blank]
            top += self._sampled_top(choice.tokens, choice.logprobs) or []
        return self._block([*echo.tokens, *choice.tokens], [*(echo.logprobs or blank), *choice.logprobs], top)

    def whole_choice(self, choice: Choice) -> dict[str, Any]:
        if choice.echo is None:
            text, block = choice.text, self.logprob_block(choice.tokens, choice.logprobs) if self.logprobs else None
        else:
            text, block = choice.echo.text + choice.text, self._echo_block(choice) if self.logprobs else None
        return {"index": choice.index, "text": text, "logprobs": block, "finish_reason": choice.finish_reason}

    def chunk_choice(self, index: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
