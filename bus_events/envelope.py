"""The envelope every message on every tinker-bus topic carries, and its msgpack codec."""

from __future__ import annotations

import enum
import hashlib
import threading
import time
import uuid
from typing import Any, NamedTuple, Protocol

import msgpack
import msgspec
import zstandard

from bus_events import payloads as p

SCHEMA_VERSION = 1
DEFAULT_CLAIM_CHECK_BYTES = 1 << 20
# Inline payloads from this size travel zstd-compressed (`payload_zstd`) when that saves a tenth: an 8 x 2048 step's
# 198 KB become ~45 KB in ~0.1 ms, which the broker then writes in half the time (Tansu: ~6 us a KB), issue 14.
COMPRESS_FROM_BYTES = 16 << 10
MAX_PAYLOAD_BYTES = 64 << 20  # what a reader inflates a payload_zstd to at most (a bomb is refused, not inflated)
_ZSTD = threading.local()  # a (de)compressor per thread: zstandard's are not safe to share between threads


class EventType(enum.StrEnum):
    CREATE_MODEL = "create_model"
    LOAD_WEIGHTS = "load_weights"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    SAVE_WEIGHTS_EXTERNAL = "save_weights_external"
    GET_INFO = "get_info"
    UNLOAD_MODEL = "unload_model"
    EXPORT_MODEL = "export_model"
    SEQ_VOID = "seq_void"
    SAMPLE = "sample"
    CANCEL = "cancel"
    RESULT = "result"
    SAMPLE_DELTA = "sample_delta"
    DEAD_LETTER = "dead_letter"


PAYLOAD_TYPES: dict[EventType, type[msgspec.Struct]] = {
    EventType.CREATE_MODEL: p.CreateModel,
    EventType.LOAD_WEIGHTS: p.LoadWeights,
    EventType.FORWARD_BACKWARD: p.ForwardBackward,
    EventType.OPTIM_STEP: p.OptimStep,
    EventType.SAVE_WEIGHTS: p.SaveWeights,
    EventType.SAVE_WEIGHTS_FOR_SAMPLER: p.SaveWeightsForSampler,
    EventType.SAVE_WEIGHTS_EXTERNAL: p.SaveWeightsExternal,
    EventType.GET_INFO: p.GetInfo,
    EventType.UNLOAD_MODEL: p.UnloadModel,
    EventType.EXPORT_MODEL: p.ExportModel,
    EventType.SEQ_VOID: p.SeqVoid,
    EventType.SAMPLE: p.Sample,
    EventType.CANCEL: p.Cancel,
    EventType.RESULT: p.Result,
    EventType.SAMPLE_DELTA: p.SampleDelta,
    EventType.DEAD_LETTER: p.DeadLetter,
}

# The inverse of PAYLOAD_TYPES: a payload's class names its event type (each class serves exactly one type).
EVENT_TYPES: dict[type[msgspec.Struct], EventType] = {cls: event_type for event_type, cls in PAYLOAD_TYPES.items()}


def event_type_of(payload: msgspec.Struct | type[msgspec.Struct]) -> EventType:
    """The event type that carries `payload` (an instance or a payload class)."""
    cls = payload if isinstance(payload, type) else type(payload)
    try:
        return EVENT_TYPES[cls]
    except KeyError:
        raise TypeError(f"{cls.__name__} is not the payload of any event type") from None


# How far past a model's next expected seq_id an event may be (docs/events.md "Ids, seq_id and ordering"). The
# SDK runs at most a few dozen requests ahead (chunked forward_backwards, pipelining); a bigger jump is a bug or
# abuse that would only open a gap nobody fills. The gateway refuses it with a 400 on `seq_id`, the trainer answers
# it with an error without letting it consume anything.
MAX_SEQ_AHEAD = 1 << 16

TRAINING_EVENTS = frozenset(
    {
        EventType.CREATE_MODEL,
        EventType.LOAD_WEIGHTS,
        EventType.FORWARD_BACKWARD,
        EventType.OPTIM_STEP,
        EventType.SAVE_WEIGHTS,
        EventType.SAVE_WEIGHTS_FOR_SAMPLER,
        EventType.SAVE_WEIGHTS_EXTERNAL,
        EventType.GET_INFO,
        EventType.UNLOAD_MODEL,
        EventType.EXPORT_MODEL,
        EventType.SEQ_VOID,
    }
)

# Requests that get no `result` of their own: a void consumes a seq_id, a cancel only skips another request.
UNANSWERED_EVENTS = frozenset({EventType.SEQ_VOID, EventType.CANCEL})


DEFAULT_TENANT = "default"  # development mode's tenant, and that of an event that names none


class ContractError(ValueError):
    """A message that breaks the contract. `request_id` is set when the envelope got that far."""

    def __init__(self, message: str, request_id: str | None = None, model_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.model_id = model_id


class PayloadRef(msgspec.Struct, forbid_unknown_fields=True):
    """Claim check: the payload's msgpack bytes live in object storage at `key`."""

    key: str
    size: int
    sha256: str


class Envelope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    v: int
    type: EventType
    request_id: str
    model_id: str
    tenant: str = DEFAULT_TENANT
    seq_id: int | None = None
    created_at: float = 0.0
    trace_id: str = ""
    payload: dict[str, Any] | None = None
    payload_ref: PayloadRef | None = None
    payload_zstd: bytes | None = None  # the payload's msgpack bytes as one zstd frame


PAYLOAD_FIELDS = ("payload", "payload_ref", "payload_zstd")  # an envelope carries its payload in exactly one


class BlobStore(Protocol):
    """Where claim-checked payloads live (artifact_store implements it on S3)."""

    def put_blob(self, key: str, data: bytes) -> None: ...

    def get_blob(self, key: str) -> bytes: ...


class Event(NamedTuple):
    """An envelope and its typed payload, as made by `make_event` and encoded by `encode_event`."""

    env: Envelope
    payload: msgspec.Struct


def new_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def make_event(
    event_type: EventType,
    payload: msgspec.Struct,
    *,
    model_id: str,
    request_id: str | None = None,
    seq_id: int | None = None,
    tenant: str = DEFAULT_TENANT,
    trace_id: str | None = None,
) -> Event:
    """An envelope for `payload`; encode it with `encode_event`."""
    if not isinstance(payload, PAYLOAD_TYPES[event_type]):
        raise TypeError(f"{event_type} takes {PAYLOAD_TYPES[event_type].__name__}, got {type(payload).__name__}")
    env = Envelope(
        v=SCHEMA_VERSION,
        type=event_type,
        request_id=request_id or new_id(),
        model_id=model_id,
        tenant=tenant,
        seq_id=seq_id,
        created_at=time.time(),
        trace_id=trace_id or uuid.uuid4().hex,
    )
    return Event(env, payload)


def payload_bytes(payload: msgspec.Struct) -> bytes:
    """The payload's msgpack bytes: a map of its fields, defaults omitted, bytes as msgpack bin."""
    return msgspec.msgpack.encode(payload)


def encode_event(
    env: Envelope,
    payload: msgspec.Struct,
    *,
    blob_store: BlobStore | None = None,
    claim_check_bytes: int = DEFAULT_CLAIM_CHECK_BYTES,
) -> bytes:
    """msgpack bytes of the envelope; payloads over `claim_check_bytes` go to `blob_store`."""
    return encode_envelope(env, payload_bytes(payload), blob_store=blob_store, claim_check_bytes=claim_check_bytes)


def encode_envelope(
    env: Envelope,
    body: bytes,
    *,
    blob_store: BlobStore | None = None,
    claim_check_bytes: int = DEFAULT_CLAIM_CHECK_BYTES,
) -> bytes:
    """`encode_event` of a payload already packed by `payload_bytes` (only this part does I/O: the claim check)."""
    fields: dict[str, Any] = msgspec.to_builtins(env, builtin_types=(bytes,))
    for name in PAYLOAD_FIELDS:
        fields.pop(name, None)
    if len(body) > claim_check_bytes:
        if blob_store is None:
            raise ValueError(f"payload is {len(body)} bytes (> {claim_check_bytes}) and no blob store is set")
        key = f"claims/{env.model_id}/{env.request_id}"
        blob_store.put_blob(key, body)
        fields["payload_ref"] = {"key": key, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    elif len(body) >= COMPRESS_FROM_BYTES and 10 * len(packed := _zstd()[0].compress(body)) <= 9 * len(body):
        fields["payload_zstd"] = packed
    else:
        fields["payload"] = msgspec.Raw(body)  # the bytes packed above, spliced in as they are
    return msgspec.msgpack.encode(fields)


def decode_envelope(raw: bytes) -> Envelope:
    """Decode and check the envelope only; the payload is checked by `decode_payload`."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ContractError(f"not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise ContractError(f"envelope must be a msgpack map, got {type(obj).__name__}")
    request_id = obj.get("request_id") if isinstance(obj.get("request_id"), str) else None
    model_id = obj.get("model_id") if isinstance(obj.get("model_id"), str) else None
    version = obj.get("v")
    if version != SCHEMA_VERSION:
        raise ContractError(f"unsupported schema version v={version!r}; this server speaks v={SCHEMA_VERSION}",
                            request_id, model_id)
    try:
        env = msgspec.convert(obj, Envelope)
    except msgspec.ValidationError as exc:
        raise ContractError(f"bad envelope: {exc}", request_id, model_id) from exc
    if sum(getattr(env, name) is not None for name in PAYLOAD_FIELDS) != 1:
        raise ContractError(f"envelope needs exactly one of {' / '.join(PAYLOAD_FIELDS)}", request_id, model_id)
    return env


def decode_payload(env: Envelope, blob_store: BlobStore | None = None) -> Any:
    """The typed payload of `env`, fetched from the claim check if needed and validated."""
    data: Any = env.payload
    if env.payload_ref is not None:
        if blob_store is None:
            raise ContractError("payload_ref set but no blob store configured", env.request_id, env.model_id)
        body = blob_store.get_blob(env.payload_ref.key)
        if hashlib.sha256(body).hexdigest() != env.payload_ref.sha256:
            raise ContractError(f"claim-checked payload {env.payload_ref.key} fails its sha256",
                                env.request_id, env.model_id)
        data = msgpack.unpackb(body, raw=False)
    elif env.payload_zstd is not None:
        data = msgpack.unpackb(_inflate(env), raw=False)
    try:
        return msgspec.convert(data, PAYLOAD_TYPES[env.type])
    except msgspec.ValidationError as exc:
        raise ContractError(f"bad {env.type.value} payload: {exc}", env.request_id, env.model_id) from exc


def _inflate(env: Envelope) -> bytes:
    """The payload bytes of `payload_zstd`: one frame that declares its size, at most MAX_PAYLOAD_BYTES."""
    assert env.payload_zstd is not None
    try:
        size = zstandard.frame_content_size(env.payload_zstd)
        if not 0 <= size <= MAX_PAYLOAD_BYTES:
            raise ContractError(f"payload_zstd must be one zstd frame that declares its size, at most "
                                f"{MAX_PAYLOAD_BYTES} bytes (declared: {size})", env.request_id, env.model_id)
        body = _zstd()[1].decompress(env.payload_zstd, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ContractError(f"payload_zstd does not decompress: {exc}", env.request_id, env.model_id) from exc
    if len(body) != size:
        raise ContractError(f"payload_zstd holds {len(body)} bytes, its frame declares {size}", env.request_id,
                            env.model_id)
    return body


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    """This thread's pair (level 1 writes the content size into the frame header)."""
    if not hasattr(_ZSTD, "pair"):
        _ZSTD.pair = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    return _ZSTD.pair
