"""The OpenAI API's text handling without a stack: streamed pieces add up to the whole answer, and nothing that
may still change (half a UTF-8 character, the start of a stop string) is released early."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus_events import payloads as p
from bus_gateway.openai_api.text import REPLACEMENT, TextStream, visible_text
from bus_runtime.base_models import load_tokenizer
from bus_runtime.testing import make_tiny_model
from sampler_consumer.streaming import Watched

TEXT = "Once upon a café, the naïve fox said: ça va? Paris."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(str(make_tiny_model(Path(tmp_path_factory.mktemp("openai-units")) / "tiny")))


def _pieces(tokenizer, tokens: list[int], stops: list[str]) -> list[str]:
    stream = TextStream(tokenizer, stops)
    pieces = []
    for i, token in enumerate(tokens):
        assert stream.extend(i, [token], [-1.0])
        pieces.append(stream.piece())
    pieces.append(stream.piece(final=True))
    return pieces


def test_pieces_add_up_and_never_show_half_a_character(tokenizer):
    tokens = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(tokens) > len(TEXT) // 4  # several tokens, some of them half a character
    pieces = _pieces(tokenizer, tokens, [])
    assert "".join(pieces) == TEXT == visible_text(tokenizer, tokens, [])[0]
    assert not any(REPLACEMENT in piece for piece in pieces)


def test_stop_string_is_cut_and_its_start_held_back(tokenizer):
    tokens = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stop = "ça va"
    pieces = _pieces(tokenizer, tokens, [stop])
    expected = TEXT[:TEXT.index(stop)]
    assert "".join(pieces) == expected == visible_text(tokenizer, tokens, [stop])[0]
    assert visible_text(tokenizer, tokens, [stop])[1] is True
    released = ""
    for piece in pieces:  # "ç" may start the stop: nothing of it went out before the stop was decided
        released += piece
        assert stop not in released and not released.endswith("ç")


def test_a_delta_after_a_gap_is_refused_and_a_repeat_is_harmless(tokenizer):
    tokens = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [])
    assert not stream.extend(1, tokens[1:], [0.0] * (len(tokens) - 1))  # position 0 missing
    assert stream.extend(0, tokens[:1], [0.0]) and stream.extend(0, tokens, [0.0] * len(tokens))
    assert stream.piece(final=True) == "hello world"
    assert stream.new_logprobs() == (tokens, [0.0] * len(tokens)) and stream.new_logprobs() == ([], [])


def test_sampler_deltas_carry_only_new_tokens():
    watched = Watched(env=None, pieces=[])  # type: ignore[arg-type]
    assert watched.next_delta({}) is None
    first = watched.next_delta({0: ([5, 6], [-0.1, -0.2]), 1: ([7], [-0.3])})
    assert first == p.SampleDelta(sequences=[p.SequenceDelta(index=0, start=0, tokens=[5, 6], logprobs=[-0.1, -0.2]),
                                             p.SequenceDelta(index=1, start=0, tokens=[7], logprobs=[-0.3])])
    second = watched.next_delta({0: ([5, 6, 8], [-0.1, -0.2, -0.4]), 1: ([7], [-0.3])})
    assert second == p.SampleDelta(sequences=[p.SequenceDelta(index=0, start=2, tokens=[8], logprobs=[-0.4])])
    assert watched.next_delta({0: ([5, 6, 8], [-0.1, -0.2, -0.4])}) is None
