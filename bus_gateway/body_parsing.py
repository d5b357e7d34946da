"""JSON bodies of the data routes (up to GatewayConfig.max_body_bytes) are parsed off the event loop, so /healthz
and every other request keep being answered while a big body is read (issue 20 item 4: a 50 MB body stalled
/healthz for 5.5 s).

A worker thread alone does not do it: msgspec holds the GIL for a whole `decode` call, so a 60 MB body parsed in
one call in a thread still stops the event loop for the whole parse. `decode_in_pieces` therefore parses a big
body piece by piece in the thread, each piece its own decode call, so the GIL goes back to the event loop between
pieces: an object's fields, a list's elements (found by msgspec's fast `Raw` scan, which builds no objects), a
number list's runs of values; below PIECE_BYTES a value is decoded in one call. The pieces are typed decodes of the
route's own body type, and the finished values go through one `msgspec.convert` to that type (structs pass through
it untouched), so constraints, coercions and error messages are those of a one-call decode.

`OffLoopJsonRequest` is the request class of the data routes (app.DATA_ROUTES): Litestar asks it for the JSON of
the handler's `data` parameter and gets the finished struct, which its own conversion passes through. Routes that
read the body themselves (the JSON form of /api/v1/forward_backward) call `decode_body`.
"""

from __future__ import annotations

import asyncio
import re
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, Union

import msgspec
from litestar import Request
from litestar.exceptions import ClientException

from bus_gateway.errors import FieldError

PIECE_BYTES = 256 << 10  # a value smaller than this is decoded in one call (well under a millisecond)

_AT = re.compile(r" - at `\$([^`]*)`$")
_NUMBERS = (int, float)


class _PieceError(Exception):
    """A ValidationError inside a piece, with the piece's path so far (msgspec only knows the path in the piece)."""

    def __init__(self, path: str, error: msgspec.ValidationError):
        super().__init__(path, error)
        self.path, self.error = path, error

    def message(self) -> str:
        text = str(self.error)
        found = _AT.search(text)
        inner = found.group(1) if found else ""
        return f"{_AT.sub('', text)} - at `${self.path}{inner}`"


def _decode(raw: bytes | msgspec.Raw, tp: Any, path: str) -> Any:
    try:
        return msgspec.json.decode(raw, type=tp, strict=False)
    except msgspec.ValidationError as exc:
        raise _PieceError(path, exc) from exc


def _convert(value: Any, tp: Any, path: str) -> Any:
    try:
        return msgspec.convert(value, tp, strict=False)
    except msgspec.ValidationError as exc:
        raise _PieceError(path, exc) from exc


def _strip(tp: Any) -> Any:
    """The type under Annotated[...] and `X | None`; None when it is some other union."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        return _strip(members[0]) if len(members) == 1 else None
    return tp


def _union_member(raw: bytes | msgspec.Raw, tp: Any) -> Any:
    """The member of union `tp` that `raw` must be, when its first byte and the members' kinds (or the tag of a
    tagged struct) say; None when only a one-call decode can tell."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return None
    members = [m for m in typing.get_args(tp) if m is not type(None)]
    first = bytes(memoryview(raw)[:64]).lstrip()[:1]
    if first == b"[":
        lists = [m for m in members if typing.get_origin(_strip(m)) is list]
        return lists[0] if len(lists) == 1 else None
    structs = [m for m in members if isinstance(_strip(m), type) and issubclass(_strip(m), msgspec.Struct)]
    if first != b"{" or not structs:
        return None
    if len(structs) == 1:
        return structs[0]
    found = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    for member in structs:
        info = msgspec.inspect.type_info(member)
        if isinstance(info, msgspec.inspect.StructType) and info.tag_field in found \
                and msgspec.json.decode(found[info.tag_field]) == info.tag:
            return member
    return None


def _number_runs(raw: bytes | msgspec.Raw) -> Iterator[bytes]:
    """A JSON array of numbers as arrays of about PIECE_BYTES each (numbers hold no commas)."""
    inner = bytes(raw).strip()[1:-1]
    start = 0
    while start < len(inner):
        end = inner.find(b",", start + PIECE_BYTES)
        end = len(inner) if end < 0 else end
        yield b"[" + inner[start:end] + b"]"
        start = end + 1


def _pieces(raw: bytes | msgspec.Raw, tp: Any, path: str) -> Any:
    """`raw` decoded as `tp`, big values piece by piece (see the module doc)."""
    if len(raw) < PIECE_BYTES or memoryview(raw)[:4] == b"null":
        return _decode(raw, tp, path)
    inner = _strip(tp)
    if inner is None:
        member = _union_member(raw, tp)
        return _decode(raw, tp, path) if member is None else _pieces(raw, member, path)
    if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
        return _struct(raw, inner, path)
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner) or (Any,)
        if _strip(item) in _NUMBERS:
            items: list[Any] = []
            run_type = types.GenericAlias(list, (item,))
            for run in _number_runs(raw):
                try:
                    items.extend(msgspec.json.decode(run, type=run_type, strict=False))
                except msgspec.ValidationError as exc:  # the index in the run is not the index in the list
                    found_at = _AT.search(str(exc))
                    local = int(found_at.group(1)[1:].split("]")[0]) if found_at else 0
                    raise _PieceError(f"{path}[{len(items) + local}]",
                                      msgspec.ValidationError(_AT.sub("", str(exc)))) from None
        else:
            parts = _decode(raw, list[msgspec.Raw], path)
            items = [_pieces(part, item, f"{path}[{i}]") for i, part in enumerate(parts)]
        # The items are checked; only the list's own constraints (Meta(min_length=...)) are left.
        return _convert(items, tp, path) if _constrained(tp) else items
    return _decode(raw, tp, path)


def _struct(raw: bytes | msgspec.Raw, struct: type[msgspec.Struct], path: str) -> msgspec.Struct:
    """An object decoded field by field; the struct is built from the checked values (its __post_init__ runs)."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    found = _decode(raw, dict[str, msgspec.Raw], path)
    fields = msgspec.structs.fields(struct)
    known = {f.encode_name for f in fields} | {info.tag_field}
    problem = next((f"Object contains unknown field `{name}`" for name in found
                    if name not in known and info.forbid_unknown_fields), None)
    problem = problem or next((f"Object missing required field `{f.encode_name}`" for f in fields
                               if f.required and f.encode_name not in found), None)
    if info.tag_field is not None and msgspec.json.decode(found.get(info.tag_field, b"null")) != info.tag:
        problem = problem or f"Invalid value for `{info.tag_field}`: expected {info.tag!r}"
    if problem is not None:
        raise _PieceError(path, msgspec.ValidationError(problem))
    values = {f.name: _pieces(found[f.encode_name], f.type, f"{path}.{f.encode_name}") for f in fields
              if f.encode_name in found}
    try:
        return struct(**values)
    except (TypeError, ValueError) as exc:  # what its __post_init__ refuses
        raise _PieceError(path, msgspec.ValidationError(str(exc))) from exc


def _constrained(tp: Any) -> bool:
    """Whether `tp` (under `X | None`) carries msgspec.Meta constraints."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        tp = members[0] if len(members) == 1 else tp
    return typing.get_origin(tp) is Annotated


def decode_in_pieces(body: bytes, body_type: Any) -> Any:
    """`body` decoded as `body_type`, the GIL released between pieces (blocking: run it in a thread)."""
    return _pieces(body or b"null", body_type, "")


async def decode_body(body: bytes, body_type: Any) -> Any:
    """`body` decoded as `body_type` in a worker thread; a body that breaks the schema is a FieldError naming the
    field, one that is not JSON a 400 (its out-of-range numbers are named by errors.http_error_response)."""
    try:
        if len(body) < PIECE_BYTES:  # one decode well under a millisecond: a thread hop would cost more (asample)
            return decode_in_pieces(body, body_type)
        return await asyncio.to_thread(decode_in_pieces, body, body_type)
    except _PieceError as exc:
        message = exc.message()
        found = _AT.search(message)
        field = found.group(1).lstrip(".") if found else ""
        raise FieldError(field or "body", message) from exc
    except msgspec.DecodeError as exc:
        raise ClientException(detail=f"body: {exc}") from exc


class OffLoopJsonRequest(Request):
    async def json(self) -> Any:
        data = self.route_handler.parsed_fn_signature.parameters.get("data")
        if data is None:  # no body parameter: nothing big is parsed here
            return await super().json()
        return await decode_body(await self.body(), data.annotation)
