"""Generated tokens -> the text OpenAI clients see: special tokens dropped, cut before the first stop string (the
sampler keeps the token that completed it). `TextStream` gives the same text in pieces as tokens arrive, holding
back what may still change: an incomplete UTF-8 character, or the beginning of a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what decoding shows for the bytes of a character not complete yet


def visible_text(tokenizer: Any, tokens: Sequence[int], stops: Sequence[str]) -> tuple[str, bool]:
    """(text, whether a stop string ended it)."""
    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` might still change or turn out to open a stop string."""
    hold = len(text) - len(text.rstrip(REPLACEMENT))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class TextStream:
    """One choice's text, released piece by piece; the pieces add up to `visible_text` of the final tokens."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.emitted = ""
        self.reported = 0  # tokens whose logprobs went out with a piece

    def extend(self, start: int, tokens: Sequence[int], logprobs: Sequence[float]) -> bool:
        """Apply a delta (tokens from position `start`); False if it leaves a gap (a delta was missed)."""
        if start > len(self.tokens):
            return False
        self.tokens[start:] = tokens
        self.logprobs[start:] = logprobs
        return True

    def piece(self, final: bool = False) -> str:
        text, stopped = visible_text(self.tokenizer, self.tokens, self.stops)
        if not (final or stopped):
            text = text[:len(text) - _held_back(text, self.stops)]
        if not text.startswith(self.emitted):
            return ""  # decoding revised released text (cannot happen with byte-level BPE): keep what went out
        new, self.emitted = text[len(self.emitted):], text
        return new

    def new_logprobs(self) -> tuple[list[int], list[float]]:
        """The tokens (and their logprobs) not reported with an earlier piece."""
        tokens, logprobs = self.tokens[self.reported:], self.logprobs[self.reported:]
        self.reported = len(self.tokens)
        return tokens, logprobs
