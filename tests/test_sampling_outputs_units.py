"""The pure pieces of issue 16.2: the contract's checks, the draws and top-k on the device, CSR in and out, and the
protobuf SampleResponse as the SDK 0.38 decodes it (tinker.proto.response_conv, unmodified)."""

from __future__ import annotations

import math
import re

import msgspec
import numpy as np
import pytest
import torch
from tinker.proto.response_conv import deserialize_sample_response

from bus_events import payloads as p
from bus_events import tensor_from_numpy
from bus_gateway.csr import csr_to_dense, dense_to_csr
from bus_gateway.errors import FieldError
from bus_gateway.proto_codec import encode_sample_response
from sampler_consumer.sampling import draw_alternatives, sample_rows, top_logprobs


def _prompt(n: int) -> p.Tensor:
    return tensor_from_numpy(np.arange(n, dtype=np.int32))


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("prompt, target, alt_k, vocab, start", [
    (5, np.zeros((3, 1), dtype=np.int64), 0, None, "target_prompt_logprobs must be [len(prompt) - 1, K] = [4, "),
    (5, np.zeros((4, 0), dtype=np.int64), 0, None, "target_prompt_logprobs must be"),
    (5, np.full((4, 2), -1), 0, None, "target_prompt_logprobs names no token id"),
    (5, np.array([[1], [-2], [0], [0]]), 0, None, "target_prompt_logprobs ids must be -1"),
    (5, np.array([[1], [7], [0], [0]]), 0, 7, "target_prompt_logprobs ids must be -1 (none) or in [0, 7)"),
    (5, None, -1, None, "prompt_alt_tokens_k must be >= 0"),
    (5, None, p.MAX_PROMPT_OUTPUT_CELLS, None, "prompt_alt_tokens_k"),
    (5, np.zeros((4, p.MAX_PROMPT_OUTPUT_CELLS // 4 + 1), dtype=np.int64), 0, None, "target_prompt_logprobs [4, "),
])
def test_prompt_output_problems_name_their_field(prompt, target, alt_k, vocab, start):
    problem = p.prompt_output_problem(prompt, target, alt_k, vocab)
    assert problem is not None and problem.startswith(start)


def test_good_prompt_outputs_pass_and_the_sample_payload_checks_them_too():
    assert p.prompt_output_problem(5, np.array([[1, -1], [-1, -1], [0, 3], [-1, 2]]), 4, 7) is None
    assert p.prompt_output_problem(1, None, 3) is None  # a one-token prompt has no position to draw at
    good = p.Sample(sampling_session_id="s", prompt=_prompt(3), topk_sample_logprobs=2, prompt_alt_tokens_k=2,
                    target_prompt_logprobs=tensor_from_numpy(np.array([[4], [-1]], dtype=np.int64)))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(good), type=p.Sample) == good
    for bad, message in (({"topk_sample_logprobs": -1}, "topk_sample_logprobs must be >= 0"),
                         ({"target_prompt_logprobs": tensor_from_numpy(np.zeros((2, 1), dtype=np.float32))},
                          "target_prompt_logprobs must hold integer token ids"),
                         ({"target_prompt_logprobs": tensor_from_numpy(np.zeros((3, 1), dtype=np.int64))},
                          "target_prompt_logprobs must be [len(prompt) - 1, K]")):
        with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
            p.Sample(sampling_session_id="s", prompt=_prompt(3), **bad)


def test_an_inflight_save_is_ephemeral_and_has_a_session():
    assert p.SaveWeightsForSampler(sampling_session_id="s:sample:1", kind="inflight").kind == "inflight"
    for bad in ({"name": "x", "sampling_session_id": "s:sample:1"}, {}):
        with pytest.raises(msgspec.ValidationError, match="inflight"):
            p.SaveWeightsForSampler(kind="inflight", **bad)


# ----------------------------------------------------------------------------- on the device


def test_top_logprobs_match_log_softmax_and_the_sampled_logprob_exactly():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ids, values = top_logprobs(logits, 5)
    expected_values, expected_ids = torch.log_softmax(logits, -1).topk(5, dim=-1)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(values, expected_values, atol=1e-6, rtol=0)
    zeros = torch.zeros(4, dtype=torch.long)
    tokens, logprobs = sample_rows(logits, torch.ones(4), zeros, torch.ones(4), zeros, zeros, None, None)  # greedy
    assert torch.equal(tokens, ids[:, 0]) and torch.equal(logprobs, values[:, 0])


def test_draws_follow_the_tempered_distribution_and_ignore_chunking():
    logprobs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 5.0]]), -1)
    k = 20_000
    whole = draw_alternatives(logprobs, k, 0.5, seed=42, first_row=0)
    assert whole.shape == (2, k)
    for row in range(2):
        frequencies = torch.bincount(whole[row], minlength=4).double() / k
        expected = torch.softmax(logprobs[row].double() / 0.5, -1)
        assert torch.allclose(frequencies, expected, atol=0.01), (frequencies, expected)
    second_alone = draw_alternatives(logprobs[1:], k, 0.5, seed=42, first_row=1)  # a later chunk: same draws
    assert torch.equal(second_alone[0], whole[1])
    assert not torch.equal(draw_alternatives(logprobs, k, 0.5, seed=43, first_row=0), whole)
    assert torch.equal(draw_alternatives(logprobs, 3, 0.0, seed=1, first_row=0), torch.tensor([[0] * 3, [3] * 3]))


# ----------------------------------------------------------------------------- CSR and the SDK's decoder


def test_csr_round_trip_and_bad_indices():
    dense = np.array([[-1, 4, -1], [-1, -1, -1], [7, -1, 9]], dtype=np.int64)
    values, crow, cols = dense_to_csr(dense, dense >= 0)
    assert values.tolist() == [4, 7, 9] and crow.tolist() == [0, 1, 1, 3] and cols.tolist() == [1, 0, 2]
    np.testing.assert_array_equal(csr_to_dense(values, crow, cols, [3, 3], "t", pad=-1), dense)
    with pytest.raises(FieldError) as bad:
        csr_to_dense(values, np.array([0, 1, 1, 4]), cols, [3, 3], "t")
    assert bad.value.field == "t.sparse_csr"
    with pytest.raises(FieldError) as flat:
        csr_to_dense(values, crow, cols, [9], "t")
    assert flat.value.field == "t.shape"


def _result() -> p.SampleResult:
    topk = p.TopkLogprobs(token_ids=tensor_from_numpy(np.array([[3, 1], [2, 0]], dtype=np.int32)),
                          logprobs=tensor_from_numpy(np.array([[-0.5, -1.5], [-0.125, -3.0]], dtype=np.float32)))
    seq = p.SampledSequence(tokens=tensor_from_numpy(np.array([3, 2], dtype=np.int32)),
                            logprobs=tensor_from_numpy(np.array([-0.5, -0.125], dtype=np.float32)),
                            stop_reason="length", topk_logprobs=topk)
    scored = np.array([[-2.0, math.nan], [math.nan, math.nan], [math.nan, -0.25]], dtype=np.float32)
    alt = p.PromptAltTokens(tokens=tensor_from_numpy(np.array([[5], [6], [7]], dtype=np.int32)),
                            logprobs=tensor_from_numpy(np.array([[-1.0], [-2.0], [-3.0]], dtype=np.float32)))
    return p.SampleResult(sequences=[seq], prompt_cache_hit_tokens=32, target_prompt_logprobs=tensor_from_numpy(scored),
                          prompt_alt_tokens=alt)


def test_the_sdk_decodes_every_new_sample_output():
    result = _result()
    dense = deserialize_sample_response(encode_sample_response(result))
    assert dense.prompt_cache_hit_tokens == 32
    assert dense.sequences[0].topk_logprobs == [[(3, -0.5), (1, -1.5)], [(2, -0.125), (0, -3.0)]]
    target = dense.target_prompt_logprobs
    assert target.dtype == "float32" and target.shape == [3, 2] and target.sparse_crow_indices is None
    np.testing.assert_array_equal(target.to_numpy(), [[-2.0, 0.0], [0.0, 0.0], [0.0, -0.25]])  # 0.0 where not asked
    alt = dense.prompt_alt_tokens
    assert alt.tokens.dtype == "int64" and alt.tokens.to_numpy().tolist() == [[5], [6], [7]]
    assert alt.logprobs.to_numpy().tolist() == [[-1.0], [-2.0], [-3.0]]
    sparse = deserialize_sample_response(encode_sample_response(result, target_sparse=True)).target_prompt_logprobs
    assert sparse.sparse_crow_indices == [0, 1, 1, 2] and sparse.sparse_col_indices == [0, 1]
    np.testing.assert_array_equal(sparse.to_numpy(), target.to_numpy())
    plain = deserialize_sample_response(encode_sample_response(p.SampleResult(sequences=result.sequences[:0])))
    assert plain.target_prompt_logprobs is None and plain.prompt_alt_tokens is None
    assert plain.prompt_cache_hit_tokens == 0
