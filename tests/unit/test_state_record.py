"""state.json: files the trainer wrote before TrainingStateRecord still load, and new ones keep their shape."""

from __future__ import annotations

import pytest

from bus_events import payloads as p
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.durability import DurablePoint
from trainer_consumer.inbound import BusPosition
from trainer_consumer.model_state import ModelState
from trainer_consumer.state_record import StateFormatError, read_state

# A snapshot's state.json exactly as the trainer wrote it before the record existed (hand-built dict).
LEGACY = {
    "format": 1, "model_id": "s:train:0", "tenant": "t1", "base_model": "base",
    "lora": {"base_model": "base", "rank": 8, "seed": 42, "train_attn": True, "train_mlp": False,
             "train_unembed": True, "alpha": 32.0},
    "step": 3, "saved_at_seq_id": None, "last_applied_seq_id": 7,
    "adam_params": {"learning_rate": 0.001}, "bus_position": None, "saved_at": 1764460000.5,
    "session_id": "s", "user_metadata": {"k": "v"}, "mutations": 6, "window_open": False, "unloaded": False,
    "durable_point": {"last_seq": 7, "max_offset": 120, "unsequenced_offset": None},
}


def test_a_legacy_snapshot_record_restores_the_same_model_state():
    record = read_state(LEGACY)
    assert record is not None and record.durable_point == DurablePoint(7, 120, None)
    state = ModelState.from_record(record)
    assert (state.model_id, state.tenant, state.step, state.mutations, state.session_id) == \
        ("s:train:0", "t1", 3, 6, "s")
    assert state.spec == AdapterSpec(base_model="base", lora=p.LoraSpec(rank=8, seed=42, train_mlp=False))
    assert state.last_adam_params == p.AdamParams(learning_rate=0.001) and state.user_metadata == {"k": "v"}


def test_a_new_record_writes_every_key_the_legacy_files_had():
    state = ModelState(model_id="s:train:0", tenant="t1",
                       spec=AdapterSpec(base_model="base", lora=p.LoraSpec(rank=8, seed=42, train_mlp=False)),
                       step=3, mutations=6, last_adam_params=p.AdamParams(learning_rate=0.001))
    doc = state.record(5, BusPosition("train", 2, 99)).to_json()
    assert set(LEGACY) - {"durable_point"} <= set(doc)
    assert {key: doc["lora"][key] for key in LEGACY["lora"]} == LEGACY["lora"]  # the legacy keys, same values
    assert doc["lora"]["optimizer"] == "adamw"  # added since (Dimuon); absent in a legacy file it reads as adamw
    assert doc["bus_position"] == {"topic": "train", "partition": 2, "offset": 99} and doc["saved_at_seq_id"] == 5
    assert read_state(doc) is not None


def test_no_state_is_none_and_another_format_is_refused():
    assert read_state({}) is None
    with pytest.raises(StateFormatError, match="format 2"):
        read_state({**LEGACY, "format": 2})
    with pytest.raises(StateFormatError, match="not readable"):
        read_state({**LEGACY, "step": "three"})
