"""The `tinker_public` protobuf messages, built from the field table of tinker-protocol.md §3.2.

We do not import the SDK on the server: the schema is declared here as a FileDescriptorProto and compiled
into message classes in a private descriptor pool (so it never clashes with the SDK's own registration of
the same package when both live in one process, as in tests).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "tinker_public"

# (name, number, kind, type_name, label) with kind one of the scalar names below or "msg"/"enum";
# label is "one" (plain proto3 field), "opt" (proto3 `optional`), "rep" (repeated) or "oneof:<name>".
_SCALARS = {
    "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "bool": _F.TYPE_BOOL, "double": _F.TYPE_DOUBLE,
    "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32,
    "msg": _F.TYPE_MESSAGE, "enum": _F.TYPE_ENUM,
}
FieldSpec = tuple[str, int, str, str, str]


def _field(name: str, number: int, kind: str, type_name: str = "", label: str = "one") -> FieldSpec:
    return (name, number, kind, type_name, label)


_MESSAGES: dict[str, list[FieldSpec]] = {
    # ------------------------------------------------------------------ request side
    "LossConfigValue": [_field("number", 1, "double", label="oneof:value"),
                        _field("text", 2, "string", label="oneof:value")],
    "EncodedTextChunk": [_field("tokens", 1, "bytes")],
    "ImageDimensions": [_field("width", 1, "uint32"), _field("height", 2, "uint32")],
    "ImageChunk": [_field("data", 1, "bytes"), _field("format", 2, "string"),
                   _field("expected_tokens", 3, "int32", label="opt"),
                   _field("override_dimensions", 4, "msg", "ImageDimensions", "opt")],
    "DmelChunk": [_field("dmel", 1, "bytes")],
    "Chunk": [_field("encoded_text", 1, "msg", "EncodedTextChunk", "oneof:chunk"),
              _field("image", 2, "msg", "ImageChunk", "oneof:chunk"),
              _field("dmel", 3, "msg", "DmelChunk", "oneof:chunk")],
    "SpanRange": [_field("sequence_id", 1, "string"), _field("offset", 2, "int64"), _field("length", 3, "int64")],
    "ProvenanceSpan": [_field("prompt_tokens", 1, "msg", "SpanRange", "oneof:span"),
                       _field("sampled_tokens", 2, "msg", "SpanRange", "oneof:span")],
    "SparseCsr": [_field("values", 1, "bytes"), _field("crow_indices", 2, "bytes"),
                  _field("col_indices", 3, "bytes")],
    "Tensor": [_field("dense", 1, "bytes", label="oneof:encoding"),
               _field("sparse_csr", 2, "msg", "SparseCsr", "oneof:encoding"),
               _field("dtype", 3, "enum", "DType"), _field("shape", 4, "int64", label="rep")],
    "Datum": [_field("model_input", 1, "msg", "Chunk", "rep"),
              _field("loss_fn_inputs", 2, "map", "string:Tensor", "rep"),
              _field("model_input_spans", 3, "msg", "ProvenanceSpan", "rep"),
              _field("loss_fn_input_spans", 4, "msg", "ProvenanceSpan", "rep")],
    "ForwardBackwardRequest": [_field("model_id", 1, "string"), _field("seq_id", 2, "int32"),
                               _field("data", 3, "msg", "Datum", "rep"), _field("loss_fn", 4, "string"),
                               _field("loss_fn_config", 5, "map", "string:double", "rep"),
                               _field("forward_only", 6, "bool"),
                               _field("loss_fn_config_v2", 7, "map", "string:LossConfigValue", "rep")],
    # ------------------------------------------------------------------ response side
    "BatchedTensor": [_field("data", 1, "bytes"), _field("offsets", 2, "bytes"), _field("dtype", 3, "enum", "DType"),
                      _field("trailing_shape", 4, "int64", label="rep")],
    "ArrayRecord": [_field("type_tag", 1, "string"), _field("fields", 2, "map", "string:BatchedTensor", "rep"),
                    _field("num_datums", 3, "int64")],
    "ForwardBackwardOutput": [_field("loss_fn_output_type", 1, "string"),
                              _field("loss_fn_outputs", 2, "msg", "ArrayRecord", "rep"),
                              _field("metrics", 3, "map", "string:double", "rep")],
    "TopkLogprobs": [_field("token_ids", 1, "bytes"), _field("logprobs", 2, "bytes"), _field("k", 3, "uint32"),
                     _field("length", 4, "uint32")],
    "PromptAltTokens": [_field("tokens", 1, "msg", "Tensor"), _field("logprobs", 2, "msg", "Tensor")],
    "SampledSequence": [_field("stop_reason", 1, "enum", "StopReason"), _field("tokens", 2, "bytes"),
                        _field("logprobs", 3, "bytes", label="opt"),
                        _field("topk_sampled_logprobs", 4, "msg", "TopkLogprobs", "opt")],
    "SampleResponse": [_field("sequences", 1, "msg", "SampledSequence", "rep"),
                       _field("prompt_logprobs", 2, "bytes", label="opt"),
                       _field("topk_prompt_logprobs", 3, "msg", "TopkLogprobs", "opt"),
                       _field("prompt_cache_hit_tokens", 4, "int32"),
                       _field("target_prompt_logprobs", 5, "msg", "Tensor", "opt"),
                       _field("prompt_alt_tokens", 6, "msg", "PromptAltTokens", "opt")],
}

_ENUMS: dict[str, list[tuple[str, int]]] = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [("DTYPE_UNSPECIFIED", 0), ("DTYPE_FLOAT32", 1), ("DTYPE_INT64", 2), ("DTYPE_INT32", 3),
              ("DTYPE_BFLOAT16", 4)],
}


def _set_type(fd: descriptor_pb2.FieldDescriptorProto, kind: str, type_name: str) -> None:
    if kind in ("msg", "enum"):
        fd.type = _SCALARS[kind]
        fd.type_name = f".{PACKAGE}.{type_name}"
    else:
        fd.type = _SCALARS[kind]


def _map_entry(msg: descriptor_pb2.DescriptorProto, field_name: str, spec: str) -> str:
    """Add the nested `<Field>Entry` message a proto3 map field is made of; return its type name."""
    key_kind, value = spec.split(":")
    entry_name = "".join(part.capitalize() for part in field_name.split("_")) + "Entry"
    entry = msg.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    key = entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL)
    _set_type(key, key_kind, "")
    val = entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL)
    _set_type(val, value if value in _SCALARS else "msg", value)
    return f"{msg.name}.{entry_name}"


def _message(name: str, fields: list[FieldSpec]) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    oneofs: dict[str, int] = {}
    synthetic: list[tuple[descriptor_pb2.FieldDescriptorProto, str]] = []
    for fname, number, kind, type_name, label in fields:
        fd = msg.field.add(name=fname, number=number, json_name=fname)
        if kind == "map":
            fd.label = _F.LABEL_REPEATED
            _set_type(fd, "msg", _map_entry(msg, fname, type_name))
            continue
        _set_type(fd, kind, type_name)
        fd.label = _F.LABEL_REPEATED if label == "rep" else _F.LABEL_OPTIONAL
        if label.startswith("oneof:"):
            oneof = label.split(":", 1)[1]
            if oneof not in oneofs:
                oneofs[oneof] = len(msg.oneof_decl)
                msg.oneof_decl.add(name=oneof)
            fd.oneof_index = oneofs[oneof]
        elif label == "opt":
            synthetic.append((fd, f"_{fname}"))
    # proto3 `optional` is a synthetic one-field oneof; protoc puts those after the real oneofs.
    for fd, oneof in synthetic:
        fd.proto3_optional = True
        fd.oneof_index = len(msg.oneof_decl)
        msg.oneof_decl.add(name=oneof)
    return msg


def build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name="tinker_bus/tinker_public.proto", package=PACKAGE,
                                             syntax="proto3")
    for name, values in _ENUMS.items():
        enum = fdp.enum_type.add(name=name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for name, fields in _MESSAGES.items():
        fdp.message_type.append(_message(name, fields))
    return fdp


_POOL = descriptor_pool.DescriptorPool()
_FILE = _POOL.Add(build_file_descriptor())


def _cls(name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ForwardBackwardRequest = _cls("ForwardBackwardRequest")
ForwardBackwardOutput = _cls("ForwardBackwardOutput")
SampleResponse = _cls("SampleResponse")
Tensor = _cls("Tensor")

DTYPE_UNSPECIFIED, DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 0, 1, 2, 3, 4
STOP_REASON_STOP, STOP_REASON_LENGTH = 0, 1
