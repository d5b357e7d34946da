"""Our hand-declared protobuf schema against the SDK's own tinker_public_pb2: same field numbers and types, and
bytes the SDK encodes decode here (and the other way round for responses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from google.protobuf import descriptor_pb2
from tinker import types
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from bus_events import payloads as p
from bus_events import tensor_from_numpy
from bus_gateway import proto_schema
from bus_gateway.errors import FieldError
from bus_gateway.proto_codec import (
    declared_size,
    decode_forward_backward,
    decompress_zstd,
    encode_forward_backward_output,
    encode_sample_response,
    read_forward_backward,
)
from bus_gateway.validation import validate_forward_backward


def _fields(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[int, tuple[str, int, int, str]]]:
    out = {}
    for msg in fdp.message_type:
        out[msg.name] = {f.number: (f.name, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in msg.field}
        for nested in msg.nested_type:
            out[f"{msg.name}.{nested.name}"] = {f.number: (f.name, f.type, f.label, f.type_name.rsplit(".", 1)[-1])
                                                for f in nested.field}
    return out


def test_schema_matches_the_sdk_descriptor():
    sdk = descriptor_pb2.FileDescriptorProto()
    sdk_pb.DESCRIPTOR.CopyToProto(sdk)
    ours, theirs = _fields(proto_schema.build_file_descriptor()), _fields(sdk)
    # One message serves both provenance-span arms; the SDK names them apart (same fields, same bytes).
    aliases = {"SpanRange": ["PromptProvenanceSpan", "SampledProvenanceSpan"]}
    for name, fields in ours.items():
        for sdk_name in aliases.get(name, [name]):
            for number, (field, ftype, label, type_name) in fields.items():
                sdk_field, sdk_type, sdk_label, sdk_type_name = theirs[sdk_name][number]
                assert (field, ftype, label) == (sdk_field, sdk_type, sdk_label), (name, number)
                assert sdk_type_name in aliases.get(type_name, [type_name]), (name, field, type_name)


def _sdk_request(**overrides) -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=[6, 7, 8, 9], dtype="int64", shape=[4]),
                        "advantages": types.TensorData(data=[0.0, 0.5, -1.5, 2.0], dtype="float32", shape=[4]),
                        "logprobs": types.TensorData(data=[-1.0, -2.0, -3.0, -4.0], dtype="float32", shape=[4])})
    request = types.ForwardBackwardRequest(
        model_id="sess-x:train:0", seq_id=overrides.get("seq_id", 3),
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum, datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7, "note": "text"}))
    return forward_backward_request_to_proto(request).SerializeToString()


def test_sdk_forward_backward_request_decodes():
    model_id, seq_id, build = decode_forward_backward(_sdk_request())
    fb = build()
    assert (model_id, seq_id, fb.loss_fn, fb.forward_only) == ("sess-x:train:0", 3, "ppo", False)
    assert fb.loss_fn_config == {"clip_low_threshold": 0.7, "note": "text"}
    assert len(fb.data) == 2
    datum = fb.data[0]
    assert datum.tokens.dtype == "int32" and datum.tokens.numpy().tolist() == [5, 6, 7, 8]
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int32"  # the SDK's int64, narrowed: they all fit
    assert datum.loss_fn_inputs["target_tokens"].numpy().tolist() == [6, 7, 8, 9]
    assert datum.loss_fn_inputs["advantages"].numpy().tolist() == [0.0, 0.5, -1.5, 2.0]


def test_a_target_token_beyond_int32_is_kept_whole_so_validation_names_it():
    far = 2**32 + 7  # narrowed to int32 it would read as the valid id 7
    datum = types.Datum(model_input=types.ModelInput.from_ints([5, 6]),
                        loss_fn_inputs={"target_tokens": types.TensorData(data=[6, far], dtype="int64", shape=[2])})
    request = types.ForwardBackwardRequest(model_id="sess-x:train:0", seq_id=1, forward_backward_input=types.
                                           ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"))
    fb = decode_forward_backward(forward_backward_request_to_proto(request).SerializeToString())[2]()
    targets = fb.data[0].loss_fn_inputs["target_tokens"]
    assert targets.dtype == "int64" and targets.numpy().tolist() == [6, far]
    with pytest.raises(FieldError) as info:
        validate_forward_backward(fb, vocab_size=1000)
    assert info.value.field == "data[0].loss_fn_inputs.target_tokens"


def test_seq_id_zero_means_not_given_and_zstd_bodies_decode():
    body = _sdk_request(seq_id=None)
    _, seq_id, _ = decode_forward_backward(decompress_zstd(zstandard.ZstdCompressor().compress(body), 1 << 20))
    assert seq_id is None


def test_read_decompresses_and_decodes_the_tensors_in_one_go():
    body = _sdk_request()
    model_id, seq_id, build = read_forward_backward(zstandard.ZstdCompressor().compress(body), 1 << 20)
    plain = decode_forward_backward(body)[2]()
    assert (model_id, seq_id) == ("sess-x:train:0", 3)
    assert build() == plain
    assert read_forward_backward(body, None)[2]() == plain


def test_read_keeps_a_bad_tensor_for_build_so_the_submission_layer_voids_its_seq_id():
    msg = sdk_pb.ForwardBackwardRequest(model_id="m:train:0", seq_id=4, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2, 3], dtype="<i4").tobytes()
    target = datum.loss_fn_inputs["target_tokens"]
    target.dtype, target.shape[:] = sdk_pb.DTYPE_INT64, [3]
    target.dense = np.array([1, 2], dtype="<i8").tobytes()  # two values for a shape of three
    model_id, seq_id, build = read_forward_backward(msg.SerializeToString(), None)
    assert (model_id, seq_id) == ("m:train:0", 4)
    with pytest.raises(FieldError) as info:
        build()
    assert info.value.field == "data[0].loss_fn_inputs.target_tokens"


def test_sparse_csr_targets_are_densified():
    msg = sdk_pb.ForwardBackwardRequest(model_id="m:train:0", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2, 3], dtype="<i4").tobytes()
    target = datum.loss_fn_inputs["target_tokens"]
    target.dtype, target.shape[:] = sdk_pb.DTYPE_INT64, [3, 2]
    target.sparse_csr.values = np.array([4, 5, 6], dtype="<i8").tobytes()
    target.sparse_csr.crow_indices = np.array([0, 1, 1, 3], dtype="<i8").tobytes()
    target.sparse_csr.col_indices = np.array([1, 0, 1], dtype="<i8").tobytes()
    fb = decode_forward_backward(msg.SerializeToString())[2]()
    assert fb.data[0].loss_fn_inputs["target_tokens"].numpy().tolist() == [[0, 4], [0, 0], [5, 6]]


@pytest.mark.parametrize(("body", "field"), [
    (b"\xff\xff\xff\xff", "body"),
    (sdk_pb.ForwardBackwardRequest(seq_id=1).SerializeToString(), "model_id"),
    (sdk_pb.ForwardBackwardRequest(model_id="../../x:train:0", seq_id=1).SerializeToString(), "model_id"),
    (sdk_pb.ForwardBackwardRequest(model_id="s:train:0", seq_id=-1).SerializeToString(), "seq_id"),
])
def test_malformed_bodies_name_the_field(body, field):
    with pytest.raises(FieldError) as info:
        decode_forward_backward(body)
    assert info.value.field == field


def test_declared_size_is_the_length_or_the_zstd_frame_header_size():
    body = b"x" * 1000
    assert declared_size(body, zstd=False) == 1000
    assert declared_size(zstandard.ZstdCompressor().compress(body), zstd=True) == 1000
    assert declared_size(zstandard.ZstdCompressor(write_content_size=False).compress(body), zstd=True) is None
    assert declared_size(b"\xff\xff\xff\xff", zstd=True) is None  # not a zstd frame: decompress_zstd says so


def test_zstd_bomb_is_capped():
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (4 << 20))
    with pytest.raises(FieldError) as info:
        decompress_zstd(bomb, 1 << 20)
    assert info.value.status_code == 413


def test_forward_backward_output_round_trips_through_the_sdk():
    ragged = [{"logprobs": tensor_from_numpy(np.array([-0.5, -1.5, -2.5], dtype="f4"))},
              {"logprobs": tensor_from_numpy(np.array([-3.0], dtype="f4"))},
              {"logprobs": tensor_from_numpy(np.array([[-1.0, -2.0], [-3.0, -4.0]], dtype="f4"))}]
    body = encode_forward_backward_output(p.ForwardBackwardResult(outputs=ragged,
                                                                  metrics={"loss:sum": 7.5, "tokens:sum": 6}))
    out = deserialize_forward_backward_output(body)
    assert out.metrics == {"loss:sum": 7.5, "tokens:sum": 6.0}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-0.5, -1.5, -2.5], [-3.0],
                                                                       [[-1.0, -2.0], [-3.0, -4.0]]]
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[3], [1], [2, 2]]


def test_sample_response_round_trips_through_the_sdk():
    result = p.SampleResult(
        sequences=[p.SampledSequence(tokens=tensor_from_numpy(np.array([7, 8, 2], dtype="i4")),
                                     logprobs=tensor_from_numpy(np.array([-0.1, -0.2, -0.3], dtype="f4")),
                                     stop_reason="stop"),
                   p.SampledSequence(tokens=tensor_from_numpy(np.array([9], dtype="i4")),
                                     logprobs=tensor_from_numpy(np.array([-1.0], dtype="f4")),
                                     stop_reason="length")],
        prompt_logprobs=tensor_from_numpy(np.array([np.nan, -1.0, -2.0, -3.0], dtype="f4")),
        topk_prompt_logprobs=p.TopkLogprobs(
            token_ids=tensor_from_numpy(np.array([[0, 0], [5, 6], [7, 0], [8, 9]], dtype="i4")),
            logprobs=tensor_from_numpy(np.array([[-99999.0, -99999.0], [-0.5, -1.0], [-0.2, -99999.0],
                                                 [-0.3, -0.4]], dtype="f4"))),
    )
    out = deserialize_sample_response(encode_sample_response(result))
    assert [s.tokens for s in out.sequences] == [[7, 8, 2], [9]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert out.prompt_logprobs[0] is None and out.prompt_logprobs[1:] == [-1.0, -2.0, -3.0]
    assert out.topk_prompt_logprobs[0] is None
    assert out.topk_prompt_logprobs[1] == [(5, -0.5), (6, -1.0)]
    assert out.topk_prompt_logprobs[2] == [(7, pytest.approx(-0.2))]

    # prompt_logprobs_last_n: everything before the last n positions becomes "not computed".
    last2 = deserialize_sample_response(encode_sample_response(result, prompt_logprobs_last_n=2))
    assert last2.prompt_logprobs[:2] == [None, None] and last2.prompt_logprobs[2:] == [-2.0, -3.0]
    assert last2.topk_prompt_logprobs[1] is None and math.isclose(last2.topk_prompt_logprobs[3][0][1], -0.3,
                                                                   rel_tol=1e-6)
