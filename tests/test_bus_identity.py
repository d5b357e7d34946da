"""Identity on the bus (issue 20 item 8), on the real Tansu broker and S3: the workers sign their replies with the
reply key, and the gateway's bus listener drops results and requests that are not signed as they should be, so a
producer that can write a topic cannot answer, pre-empt or shadow another tenant's future; replay checks the
events it replays like the live trainer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import msgpack
import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord
from gateway_support import API_KEYS, HEADERS_A, BusProbe, gateway_client, retrieve, seed_model
from metrics_support import scrape
from sampler_support import add_session, sample_request
from test_gateway_validation import PROTO, _fb_body
from trainer_support import BusHarness, adam, bus_settings, fb, random_data

from artifact_store import Registry
from bus_events import EventType, encode_event, make_event, make_result
from bus_events import payloads as p
from bus_events.signing import SIGNATURE_HEADER, sign, signed_by
from bus_runtime.kafka_io import client_security, ensure_topics, make_consumer, make_producer, publish
from bus_runtime.log_reader import model_key_filter, read_bus
from bus_runtime.settings import BusSettings
from bus_runtime.testing import make_tiny_model
from sampler_consumer.config import SamplerConfig
from sampler_consumer.worker import run_sampler
from tinker_bus.log_tools import export_log
from trainer_consumer.replay import ReplayRequest, replay_model
from trainer_consumer.replay.event_log import iterate_file, read_file

pytest_plugins = ["gateway_support"]

REPLY_KEY = "workers-secret"
TENANT_KEYS = "alice=alice-secret,bob=bob-secret"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


async def reply_records(settings: BusSettings, want: int, timeout: float = 60) -> list[ConsumerRecord]:
    """The first `want` raw records of the reply topic (value and headers as produced)."""
    consumer = make_consumer(settings, settings.topics.replies, group_id=None)
    await consumer.start()
    found: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < want:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(records)
    finally:
        await consumer.stop()
    return found


def assert_signed_with_reply_key(records: list[ConsumerRecord]) -> None:
    for record in records:
        signature = dict(record.headers).get(SIGNATURE_HEADER)
        assert signed_by(REPLY_KEY.encode(), record.value, signature), (record.topic, record.offset)


async def test_the_trainer_signs_its_replies_with_the_reply_key(settings, tiny):
    signed = bus_settings(settings, tiny, reply_key=REPLY_KEY)
    async with BusHarness(signed) as bus:
        created = await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), "m:train:0", 0)
        await bus.ok(created)
        # A poisoned event whose request_id is readable: its error reply comes from the dead-letter path.
        poison = msgpack.packb({"v": 1, "type": "get_info", "request_id": "req-poison", "model_id": "m:train:0",
                                "seq_id": 1, "payload": {"surprise": 1}})
        await bus.publish_raw(poison, "m:train:0")
        assert (await bus.reply("req-poison")).error is not None
    assert_signed_with_reply_key(await reply_records(signed, 2))


async def test_the_sampler_signs_its_replies_with_the_reply_key(settings, store, tiny):
    signed = dataclasses.replace(settings, device="cpu", reply_key=REPLY_KEY)
    session = add_session(Registry(store), "s:sample:0", tiny, None)
    ready = asyncio.Event()
    task = asyncio.create_task(run_sampler(signed, ready=ready, config=SamplerConfig()))
    producer = make_producer(signed)
    try:
        await asyncio.wait_for(ready.wait(), 60)
        await producer.start()
        request = sample_request(session, [5, 17, 42], params=p.SamplingParams(max_tokens=2, seed=1))
        env, _ = make_event(EventType.SAMPLE, request, model_id=session)
        await publish(producer, signed.topics.sample, env, request, claim_check_bytes=signed.claim_check_bytes)
        records = await reply_records(signed, 1)
    finally:
        await producer.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert msgpack.unpackb(records[0].value)["request_id"] == env.request_id
    assert_signed_with_reply_key(records)


async def test_the_gateway_drops_results_not_signed_with_the_reply_key(gw_settings):
    """A producer that can write the reply topic (even with a tenant's own key) cannot answer a future: its
    results are dropped, logged and counted; the workers' signed result is the one the caller gets."""
    settings = dataclasses.replace(gw_settings, reply_key=REPLY_KEY, event_keys=TENANT_KEYS)
    model_id = seed_model(settings, "alice")
    async with BusProbe(settings) as bus, gateway_client(settings, API_KEYS) as client:
        promised = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 1), headers=PROTO)
        assert promised.status_code == 200, promised.text
        request, _ = await bus.next_event(EventType.FORWARD_BACKWARD)

        def answer(message: str) -> bytes:
            env, payload = make_result(request, error=p.ErrorInfo(message=message, category="user"))
            return encode_event(env, payload, claim_check_bytes=settings.claim_check_bytes)

        key = model_id.encode()
        forged, with_tenant_key, genuine = answer("forged"), answer("alice's own key"), answer("the answer")
        # A result on a request topic is no result at all (there, only a tenant's signature would be checked).
        read = (await client.get("/healthz")).json()["components"]["gateway"]["records_read"]
        await bus.producer.send_and_wait(settings.topics.train, with_tenant_key, key=key, headers=[
            (SIGNATURE_HEADER, sign(b"alice-secret", with_tenant_key))])
        async with asyncio.timeout(30):
            while (await client.get("/healthz")).json()["components"]["gateway"]["records_read"] <= read:
                await asyncio.sleep(0.05)
        await bus.producer.send_and_wait(settings.topics.replies, forged, key=key)
        await bus.producer.send_and_wait(settings.topics.replies, with_tenant_key, key=key, headers=[
            (SIGNATURE_HEADER, sign(b"alice-secret", with_tenant_key))])
        await bus.producer.send_and_wait(settings.topics.replies, genuine, key=key, headers=[
            (SIGNATURE_HEADER, sign(REPLY_KEY.encode(), genuine))])  # same partition: read after the forgeries

        answered = await retrieve(client, promised.json()["request_id"], HEADERS_A)
        assert answered.json()["error"] == "the answer"
        health = (await client.get("/healthz")).json()["components"]["gateway"]
        assert health["unverified"] == {settings.topics.replies: 2}
        metrics = await asyncio.to_thread(scrape, str(client.base_url.join("/metrics")))
        assert metrics.get(("tinker_bus_gateway_unverified_records_total", (("topic", settings.topics.replies),))) \
            == 2.0


async def test_the_gateway_ignores_requests_on_the_bus_not_signed_by_their_tenant(gw_settings):
    """A forged request naming alice's model and next seq_id would otherwise become the future alice's own
    request is deduplicated to (and never answered: the trainer dead-letters the forgery)."""
    settings = dataclasses.replace(gw_settings, event_keys=TENANT_KEYS)
    model_id = seed_model(settings, "alice")
    forged_env, forged_payload = make_event(EventType.GET_INFO, p.GetInfo(), model_id=model_id, seq_id=1,
                                            tenant="alice")
    forged = encode_event(forged_env, forged_payload, claim_check_bytes=settings.claim_check_bytes)
    async with BusProbe(settings) as bus, gateway_client(settings, API_KEYS) as client:
        await bus.producer.send_and_wait(settings.topics.train, forged, key=model_id.encode(), headers=[
            (SIGNATURE_HEADER, sign(b"bob-secret", forged))])
        async with asyncio.timeout(30):
            while (await client.get("/healthz")).json()["components"]["gateway"]["unverified"] \
                    != {settings.topics.train: 1}:
                await asyncio.sleep(0.05)
        promised = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 1), headers=PROTO)
        assert promised.status_code == 200, promised.text
        assert promised.json()["request_id"] != forged_env.request_id
        await bus.next_event(EventType.GET_INFO)  # the forgery itself, then alice's request is on the bus
        request, _ = await bus.next_event(EventType.FORWARD_BACKWARD)
        assert request.request_id == promised.json()["request_id"]


async def test_replay_skips_events_not_signed_by_their_tenant_from_the_bus_and_from_an_export(settings, store,
                                                                                              tiny, tmp_path):
    """Replay checks signatures like the live trainer: a forged or unsigned event in the log is skipped (counted as
    `unverified`) and voids nothing, from the broker and from an export-log file, a claim-checked event included
    (its signature covers the record as it was on the bus)."""
    signed = dataclasses.replace(settings, event_keys=TENANT_KEYS)
    model_id = "alice:train:0"
    producer = make_producer(signed)
    await producer.start()

    async def send(kind: EventType, payload, seq: int, key: bytes | None, claim_check: bool = False) -> None:
        env, body = make_event(kind, payload, model_id=model_id, seq_id=seq, tenant="alice")
        raw = encode_event(env, body, blob_store=store if claim_check else None,
                           claim_check_bytes=1 if claim_check else signed.claim_check_bytes)
        headers = [(SIGNATURE_HEADER, sign(key, raw))] if key else None
        await producer.send_and_wait(signed.topics.train, raw, key=model_id.encode(), headers=headers)

    try:
        await send(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny, lora=p.LoraSpec(rank=4, seed=1)), 0,
                   b"alice-secret")
        await send(EventType.OPTIM_STEP, adam(), 1, b"bob-secret")  # bob's key, alice's name
        await send(EventType.GET_INFO, p.GetInfo(), 1, b"alice-secret")
        await send(EventType.FORWARD_BACKWARD, fb(random_data(5, 2)), 2, None)  # unsigned
        await send(EventType.FORWARD_BACKWARD, fb(random_data(6, 2)), 2, b"alice-secret", claim_check=True)
        await send(EventType.OPTIM_STEP, adam(), 3, b"alice-secret")
    finally:
        await producer.stop()

    async def replay(records, out, live) -> dict:
        return await replay_model(records, ReplayRequest(model_id, tmp_path / out, signed.topics.train), live=live,
                                  device="cpu", tenant_keys=signed.tenant_keys)

    def check(report: dict) -> None:
        assert [e["type"] for e in report["events"]] == ["create_model", "get_info", "forward_backward",
                                                         "optim_step"]
        assert all(e["ok"] for e in report["events"]), report["events"]
        assert (report["unverified"], report["steps_applied"]) == (2, 1)

    from_bus = await replay(read_bus(signed, [signed.topics.train], model_key_filter([model_id])), "bus", store)
    check(from_bus)
    exported = tmp_path / "alice.log"
    assert await export_log(signed, exported, [model_id], [], with_replies=False) == 6
    _, records = read_file(exported)
    from_file = await replay(iterate_file(records), "file", None)  # offline: the claim check is in the file
    check(from_file)
    assert from_file["final"]["sha256"] == from_bus["final"]["sha256"]


SASL_ENV = {"TINKER_BUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "TINKER_BUS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "TINKER_BUS_KAFKA_SASL_USERNAME": "gateway", "TINKER_BUS_KAFKA_SASL_PASSWORD": "gateway-secret"}


async def test_every_bus_client_speaks_sasl_with_the_settings_from_the_environment(settings, caplog):
    """Tansu cannot log anyone in (docs/local-infra.md "SASL"): without --authentication it refuses every SASL
    mechanism, with it its user store cannot be filled. So the plumbing is checked against the real broker from the
    other side: each kind of bus client (admin, producer, consumer) built from TINKER_BUS_KAFKA_* opens its
    connection with a SCRAM-SHA-512 handshake, which this broker refuses as an unsupported mechanism."""
    sasl = BusSettings.from_env({**settings.to_env(), **SASL_ENV})
    assert client_security(sasl) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                      "sasl_plain_username": "gateway", "sasl_plain_password": "gateway-secret"}
    attempts: list = [ensure_topics(sasl), make_producer(sasl).start(), make_consumer(sasl, group_id=None).start()]
    for attempt in attempts:
        caplog.clear()
        with pytest.raises(KafkaConnectionError):
            await attempt
        assert any("UnsupportedSaslMechanismError" in r.getMessage() for r in caplog.records), caplog.text
    # The same clients without SASL settings connect (PLAINTEXT is what Tansu speaks).
    await ensure_topics(settings)


@pytest.mark.parametrize("env,named", [
    ({"TINKER_BUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "TINKER_BUS_KAFKA_SASL_USERNAME"),
    ({**SASL_ENV, "TINKER_BUS_KAFKA_SASL_PASSWORD": ""}, "TINKER_BUS_KAFKA_SASL_PASSWORD"),
    ({"TINKER_BUS_KAFKA_SECURITY_PROTOCOL": "SSL"}, "TINKER_BUS_KAFKA_SECURITY_PROTOCOL"),
    ({**SASL_ENV, "TINKER_BUS_KAFKA_SASL_MECHANISM": "GSSAPI"}, "TINKER_BUS_KAFKA_SASL_MECHANISM"),
])
def test_incomplete_sasl_settings_are_refused_naming_the_variable(env, named):
    with pytest.raises(ValueError, match=named):
        client_security(BusSettings.from_env(env))
