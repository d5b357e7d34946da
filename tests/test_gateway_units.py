"""Fast unit tests of the gateway's pure parts, without S3, Kafka or a model: the future table, the submission
layer's parsing helpers, adapter names, and how JSON loss_fn_inputs line up with a conversation."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest

from artifact_store import MemoryObjectStore
from bus_events import EventType
from bus_events import payloads as p
from bus_events.ids import is_model_id
from bus_gateway import submit
from bus_gateway.adapter_names import (
    NAME_RULE,
    AdapterName,
    AdapterNames,
    InvalidAdapterName,
    check_adapter_name,
    named_model_id,
)
from bus_gateway.errors import FieldError
from bus_gateway.futures import Future, FutureTable, new_request_id, request_id_time
from bus_gateway.json_api.datums import per_token_values
from bus_gateway.tinker_api.schemas import (
    AdamParamsIn,
    EncodedTextChunk,
    ImageChunk,
    LoraConfig,
    SamplingParamsIn,
)


def _future(table: FutureTable, seq_id: int | None = 3, kind: EventType = EventType.FORWARD_BACKWARD,
            **kw) -> Future:
    return table.add(Future(new_request_id(), "alice", kind.value, "m", seq_id, **kw))


def _ok() -> p.Result:
    return p.Result(request_type="forward_backward", result={})


# ------------------------------------------------------------------ FutureTable
async def test_future_table_finds_the_first_request_by_seq_id_and_idempotency_key():
    table = FutureTable(ttl_s=60)
    first = _future(table, idempotency_key=("alice", "optim_step", "k1"))
    _future(table)  # a second request for the same (model, seq_id) never replaces the first
    assert table.first_for(("m", 3)) is first and table.first_for(("m", 4)) is None
    assert table.first_for_idempotency(("alice", "optim_step", "k1")) is first
    void = _future(table, kind=EventType.SEQ_VOID, seq_id=9)
    assert void.dedupe_key is None and table.first_for(("m", 9)) is None


async def test_future_table_resolves_once_and_counts_local_samples():
    table = FutureTable(ttl_s=60)
    sample = _future(table, kind=EventType.SAMPLE, local=True)
    assert table.local_pending_samples == 1
    table.resolve(sample.request_id, _ok(), tenant="alice", model_id="m", seq_id=3)
    later = p.Result(request_type="sample", error=p.ErrorInfo(message="late"))
    table.resolve(sample.request_id, later, tenant="alice", model_id="m", seq_id=3)  # a redelivered result
    assert sample.result == _ok() and sample.done.is_set() and table.local_pending_samples == 0
    assert await sample.wait(0.0)
    unknown = table.resolve("req-1-x", _ok(), tenant="bob", model_id="other", seq_id=None)
    assert table.get("req-1-x") is unknown and unknown.tenant == "bob"


async def test_future_table_sweeps_expired_entries_and_discards():
    table = FutureTable(ttl_s=10)
    old = _future(table, created_at=0.0)
    fresh = _future(table, seq_id=4)
    assert table.sweep(now=fresh.created_at + 1) == 1
    assert table.get(old.request_id) is None and table.first_for(("m", 3)) is None
    pending = _future(table, kind=EventType.SAMPLE, seq_id=5, local=True)
    table.discard(pending)
    assert table.get(pending.request_id) is None and table.local_pending_samples == 0 and len(table) == 1


async def test_future_table_waits_for_an_id_another_gateway_publishes():
    table = FutureTable(ttl_s=60)
    request_id = new_request_id()
    waiting = asyncio.create_task(table.wait_for_id(request_id, 5.0))
    await asyncio.sleep(0.01)
    arrived = table.add(Future(request_id, "alice", "optim_step", "m"))
    assert await waiting is arrived
    assert await table.wait_for_id(new_request_id(), 0.01) is None
    assert abs(request_id_time(new_request_id(now=1234.5)) - 1234.5) < 1e-3 and request_id_time("nope") is None


# ------------------------------------------------------------------ submission layer: parsing
def test_prompt_tokens_takes_encoded_text_only():
    chunks = [EncodedTextChunk(tokens=[1, 2]), EncodedTextChunk(tokens=[3])]
    assert submit.prompt_tokens(chunks).tolist() == [1, 2, 3]
    with pytest.raises(FieldError) as err:
        submit.prompt_tokens([*chunks, ImageChunk(data="", format="png")])
    assert err.value.field == "prompt.chunks[2]"


def test_adam_params_are_the_wire_struct_and_its_checks():
    assert submit.adam_params(None) == p.AdamParams()
    assert submit.adam_params(AdamParamsIn(learning_rate=0.5, type="adam")).learning_rate == 0.5
    with pytest.raises(FieldError) as err:
        submit.adam_params(AdamParamsIn(type="sgd"), "optimizer_params")
    assert err.value.field == "optimizer_params.type"
    with pytest.raises(FieldError) as err:
        submit.adam_params(AdamParamsIn(beta1=1.0))
    assert err.value.field == "adam_params.beta1" and "beta1" in err.value.message


def test_sampling_params_fold_seed_default_length_and_check_stop_ids():
    wire = submit.sampling_params(SamplingParamsIn(stop="\n", seed=2**64 - 1), vocab_size=10)
    assert wire.stop == ["\n"] and wire.seed == (2**64 - 1) % submit.SEED_MODULUS
    assert wire.max_tokens == submit.DEFAULT_MAX_TOKENS == p.SamplingParams().max_tokens
    with pytest.raises(FieldError) as err:
        submit.sampling_params(SamplingParamsIn(stop=["x", 10]), vocab_size=10)
    assert err.value.field == "sampling_params.stop[1]"


@pytest.mark.parametrize(("http", "wire"), [(AdamParamsIn, p.AdamParams), (LoraConfig, p.LoraSpec),
                                            (SamplingParamsIn, p.SamplingParams)])
def test_http_schemas_default_like_the_wire_structs(http, wire):
    """The HTTP bodies restate the wire structs' fields for the OpenAPI schema; their defaults must agree."""
    http_defaults = msgspec.structs.asdict(http())
    for name, value in msgspec.structs.asdict(wire()).items():
        if name in http_defaults and http_defaults[name] is not None:
            assert http_defaults[name] == value, name


# ------------------------------------------------------------------ adapter names
def test_adapter_names_follow_their_rule():
    for good in ("my-model", "rl-model", "A.b_c-1", "x" * 64):
        assert check_adapter_name(good) == good
    for bad in ("", "-x", "my model", "a:b", "x" * 65, "über"):
        with pytest.raises(InvalidAdapterName, match="letters, digits"):
            check_adapter_name(bad)
    assert "1 to 64 characters" in NAME_RULE


def test_named_model_ids_are_one_per_tenant_name_and_generation():
    ids = {named_model_id(t, n, g) for t in ("alice", "bob") for n in ("a", "b") for g in (0, 1)}
    assert len(ids) == 8 and all(is_model_id(i) for i in ids)
    assert named_model_id("alice", "a", 0) == named_model_id("alice", "a", 0)


def test_adapter_name_documents_per_tenant():
    names = AdapterNames(MemoryObjectStore())
    record = AdapterName(name="my-model", tenant="alice", model_id=named_model_id("alice", "my-model", 0),
                         base_model="base", lora=p.LoraSpec(rank=16))
    names.put(record)
    assert names.get("alice", "my-model") == record and names.get("bob", "my-model") is None
    assert names.list("alice") == [record] and names.list("bob") == []


# ------------------------------------------------------------------ JSON loss_fn_inputs against a conversation
MASK = np.array([0, 0, 0, 0, 1, 1, 1], dtype=np.float32)  # model_input of 7 tokens, the last 3 predict the answer


def test_a_number_spreads_over_the_assistant_tokens():
    assert per_token_values(0.5, MASK, np.zeros(7), "f").tolist() == [0, 0, 0, 0, 0.5, 0.5, 0.5]


def test_a_list_lines_up_with_the_end_and_must_reach_the_first_assistant_token():
    default = np.arange(7.0)
    assert per_token_values([9.0] * 7, MASK, default, "f").tolist() == [9.0] * 7
    assert per_token_values([7.0, 8.0, 9.0], MASK, default, "f").tolist() == [0, 1, 2, 3, 7, 8, 9]
    assert per_token_values([1.0] * 4, MASK, default, "f").tolist() == [0, 1, 2, 1, 1, 1, 1]
    for wrong in ([1.0, 1.0], [1.0] * 8):
        with pytest.raises(FieldError) as err:
            per_token_values(wrong, MASK, default, "loss_fn_inputs.logprobs[0]")
        assert err.value.field == "loss_fn_inputs.logprobs[0]" and "at least the last 3" in err.value.message
