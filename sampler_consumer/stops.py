"""When a row stops: stop token ids, stop strings, EOS (tinker-protocol.md 3.1 stop semantics).

stop=None -> the model's EOS ids stop; stop=[] -> nothing stops early; otherwise the listed strings and
token ids. The token that completes a stop string / is a stop id is kept as the last returned token.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

Decode = Callable[[Sequence[int]], str]


class StopSpecError(ValueError):
    pass


def check_stop_spec(stop: Sequence[str | int] | None) -> None:
    for item in stop or ():
        if isinstance(item, str) and not item:
            raise StopSpecError("sampling_params.stop holds an empty string, which would stop at once")
        if not isinstance(item, str) and item < 0:
            raise StopSpecError(f"sampling_params.stop holds a negative token id {item}")


class StopChecker:
    def __init__(self, stop: Sequence[str | int] | None, eos_ids: Collection[int], decode: Decode) -> None:
        check_stop_spec(stop)
        if stop is None:
            self.token_ids = frozenset(eos_ids)
            self.strings: tuple[str, ...] = ()
        else:
            self.token_ids = frozenset(int(s) for s in stop if not isinstance(s, str))
            self.strings = tuple(s for s in stop if isinstance(s, str))
        self._decode = decode
        # A character is at most 4 byte-level tokens; a few more cover tokenizers that merge across the window edge.
        self._window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def stops(self, generated: Sequence[int]) -> bool:
        """Whether the newest token of `generated` ends the sequence."""
        if generated[-1] in self.token_ids:
            return True
        if not self.strings:
            return False
        # Checked after every token, so a match in the recent window is one the newest token completed.
        text = self._decode(generated[-self._window:])
        return any(s in text for s in self.strings)
