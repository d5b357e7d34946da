"""docs/events.md is the contract for outside producers: it must match bus_events field by field, and its
example (confluent-kafka + msgpack only) must train one step against the real broker and trainer."""

from __future__ import annotations

import asyncio
import math
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bus_events import DEFAULT_CLAIM_CHECK_BYTES, RESULT_TYPES, EventType, Topics, encode_event, make_event, payloads
from bus_events import envelope as envelope_module
from bus_events import tensors as tensors_module
from bus_runtime.testing import make_tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"
DOC_TEXT = DOC.read_text()


def _structs() -> dict[str, type[msgspec.Struct]]:
    found = {}
    for module in (payloads, envelope_module, tensors_module):
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                found[name] = obj
    return found


def _section(name: str) -> str:
    """The text under the heading "#### `name`" up to the next heading."""
    match = re.search(rf"^#### `{name}`\n(.*?)(?=^#)", DOC_TEXT + "\n#", re.S | re.M)
    assert match, f"docs/events.md has no section #### `{name}`"
    return match.group(1)


def _field_rows(section: str) -> dict[str, list[str]]:
    """Rows of the section's first table (field | type | default | meaning), by field name."""
    table = re.search(r"^\| field \|.*?(?=\n\n|\Z)", section, re.S | re.M)
    rows = {}
    for line in table.group(0).splitlines() if table else []:
        match = re.match(r"^\| `(\w+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in re.split(r"(?<!\\)\|", match.group(2))]
    return rows


def _rendered_default(field: msgspec.structs.FieldInfo) -> str:
    """How the doc writes a default: msgpack-ish literals; a nested struct of defaults is `{}`."""
    if field.required:
        return "required"
    value: Any = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if value is None:
        return "`nil`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int | float):
        return f"`{value!r}`"
    if isinstance(value, dict | msgspec.Struct):
        assert not msgspec.to_builtins(value), f"{field.name}: a non-empty default needs its own rendering"
        return "`{}`"
    if isinstance(value, list):
        return "`[]`"
    raise AssertionError(f"no rendering for the default of {field.name}: {value!r}")


@pytest.mark.parametrize("name", sorted(_structs()))
def test_every_schema_is_documented_field_by_field(name):
    struct_type = _structs()[name]
    fields = msgspec.structs.fields(struct_type)
    section = _section(name)
    rows = _field_rows(section)
    if not fields:
        assert "no fields" in section
        return
    assert list(rows) == [f.encode_name for f in fields], f"{name}: documented fields differ from the schema"
    for field in fields:
        default = rows[field.encode_name][1]
        assert default == _rendered_default(field), f"{name}.{field.encode_name}: doc says {default}"


def test_every_event_type_and_topic_is_documented():
    type_row = _field_rows(_section("Envelope"))["type"][2]
    assert set(re.findall(r"`(\w+)`", type_row)) == {t.value for t in EventType}
    topics = Topics(prefix="<prefix>")
    for topic, partitions in topics.all().items():
        assert re.search(rf"^\| `{re.escape(topic)}` \| {partitions} \|", DOC_TEXT, re.M), topic
    assert f"**1 MiB** ({DEFAULT_CLAIM_CHECK_BYTES} bytes" in DOC_TEXT


def test_claim_check_key_is_the_documented_one(store):
    env, payload = make_event(EventType.FORWARD_BACKWARD, payloads.ForwardBackward(data=[payloads.Datum(
        tokens=tensors_module.tensor_from_numpy(list(range(1000)), "int32"))]), model_id="s:train:0", seq_id=1)
    raw = encode_event(env, payload, blob_store=store, claim_check_bytes=1024)
    ref = msgspec.msgpack.decode(raw)["payload_ref"]
    documented = _field_rows(_section("PayloadRef"))["key"][2]
    assert "`claims/<model_id>/<request_id>`" in documented
    assert ref["key"] == f"claims/{env.model_id}/{env.request_id}"


# ---------------------------------------------------------------------- the doc's example, run as is


def _doc_example() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", DOC_TEXT, re.S)
    code = next(b for b in blocks if "def train_one_step" in b)
    assert not re.search(r"^\s*(from|import) (bus_events|tinker_bus|trainer_consumer|artifact_store)", code, re.M)
    namespace: dict[str, Any] = {}
    exec(compile(code, f"{DOC}:example", "exec"), namespace)
    return namespace


def _floats(tensor: dict) -> tuple[float, ...]:
    assert tensor["dtype"] == "float32"
    return struct.unpack(f"<{math.prod(tensor['shape'])}f", tensor["data"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


async def test_the_doc_example_trains_one_step(settings, tiny_model):
    from trainer_consumer.worker import run_trainer

    settings = replace(settings, base_models=(str(tiny_model),))
    ready = asyncio.Event()
    trainer = asyncio.create_task(run_trainer(settings, ready=ready))
    try:
        async with asyncio.timeout(60):
            await ready.wait()
        tokens = [5, 17, 42, 9, 100, 3, 77]
        results = await asyncio.to_thread(_doc_example()["train_one_step"], settings.kafka_bootstrap,
                                          str(tiny_model), tokens, settings.topics.prefix, 120.0)
    finally:
        trainer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trainer

    assert set(results) == {"create_model", "forward_backward", "optim_step"}, results
    for request_type, result in results.items():
        assert result.get("error") is None and result.get("result") is not None, result
        assert result["request_type"] == request_type
    created = results["create_model"]["result"]
    assert created["base_model"] == str(tiny_model) and created["lora_rank"] == 8
    forward = results["forward_backward"]["result"]
    logprobs = _floats(forward["outputs"][0]["logprobs"])
    assert len(logprobs) == len(tokens) - 1 and all(lp < 0 for lp in logprobs)
    assert forward["metrics"]["loss:sum"] == pytest.approx(-sum(logprobs), rel=1e-4)
    step = results["optim_step"]["result"]["metrics"]
    assert step["grad_norm"] > 0 and step["learning_rate"] == pytest.approx(1e-4)


def test_result_table_matches_result_types():
    table = DOC_TEXT.split("| request | `result` |", 1)[1].split("\n\n", 1)[0]
    documented: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        requests, result = row.strip("|").split("|")[:2]
        for request in re.findall(r"`(\w+)`", requests):
            documented[request] = re.search(r"\[`(\w+)`\]", result).group(1)
    assert documented == {t.value: cls.__name__ for t, cls in RESULT_TYPES.items()}


def test_topk_padding_is_documented():
    section = _section("TopkLogprobs")
    assert f"`{payloads.TOPK_PAD_ID}`" in section and f"`{payloads.TOPK_PAD_LOGPROB}`" in section
