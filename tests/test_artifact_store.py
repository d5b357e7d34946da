"""artifact_store against a real S3 server (moto): layout, atomic + checksummed saves, TTL, listing, crashes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from artifact_store import (
    Checkpoint,
    CheckpointCorrupt,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointStore,
    InvalidPath,
    Registry,
    SamplingSession,
    TinkerPath,
    TrainingRun,
)
from bus_events.payloads import LoraSpec

REPO = Path(__file__).resolve().parents[1]
RUN = "sess-1:train:0"
TARGETS = {"q_proj", "v_proj", "lm_head"}  # a set, as PEFT's LoraConfig.to_dict() gives it


def _adapter(marker: float, rank: int = 2) -> Checkpoint:
    weights = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((rank, 8), marker),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.full((8, rank), -marker),
    }
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS}
    return Checkpoint(adapter_config=config, adapter_weights=weights)


def _training_state(marker: float) -> Checkpoint:
    ckpt = _adapter(marker)
    ckpt.optimizer_state = {f"{k}.exp_avg": torch.full_like(v, marker / 10) for k, v in ckpt.adapter_weights.items()}
    ckpt.state = {"step": int(marker), "kafka_offsets": {"train:3": 41}, "adam": {"lr": 1e-4}}
    return ckpt


@pytest.fixture
def ckpts(store) -> CheckpointStore:
    return CheckpointStore(store)


def test_paths_parse_and_reject():
    path = TinkerPath.parse(f"tinker://{RUN}/sampler_weights/step-1")
    assert (path.run_id, path.kind, path.name, str(path)) == (RUN, "sampler_weights", "step-1",
                                                              f"tinker://{RUN}/sampler_weights/step-1")
    assert path.prefix == f"runs/{RUN}/sampler_weights/step-1/"
    for bad in ("http://x/weights/a", "tinker://r/weights", "tinker://r/other/a", "tinker://r/weights/a/b",
                "tinker://r/weights/.."):
        with pytest.raises(InvalidPath):
            TinkerPath.parse(bad)


def test_sampler_weights_round_trip_in_peft_layout(ckpts, store, tmp_path):
    path = TinkerPath(RUN, "sampler_weights", "step-1")
    info = ckpts.save(path, _adapter(1.5), base_model="tiny", user_metadata={"note": "x"})
    assert info.version and info.base_model == "tiny" and info.size_bytes > 0
    loaded = ckpts.load(path)
    assert loaded.adapter_config["target_modules"] == sorted(TARGETS)
    for name, tensor in _adapter(1.5).adapter_weights.items():
        assert torch.equal(loaded.adapter_weights[name], tensor)
    assert loaded.optimizer_state is None and loaded.state == {}
    # Layout: versioned PEFT files plus a manifest written last.
    keys = sorted(store.list_keys(path.prefix))
    assert keys == sorted([f"{path.prefix}manifest.json", f"{path.prefix}{info.version}/adapter_config.json",
                           f"{path.prefix}{info.version}/adapter_model.safetensors"])
    folder = ckpts.download(path, tmp_path / "dl")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tinker_json = info.as_tinker_json()
    assert tinker_json["checkpoint_id"] == "sampler_weights/step-1" and tinker_json["checkpoint_type"] == "sampler"
    assert tinker_json["user_metadata"] == {"note": "x"} and "expires_at" not in tinker_json


def test_training_state_keeps_optimizer_step_and_offsets(ckpts):
    path = TinkerPath(RUN, "weights", "state-3")
    ckpts.save(path, _training_state(3.0), base_model="tiny")
    loaded, info = ckpts.load_with_info(path)
    assert loaded.state == {"step": 3, "kafka_offsets": {"train:3": 41}, "adam": {"lr": 1e-4}}
    assert set(loaded.optimizer_state) == {f"{k}.exp_avg" for k in loaded.adapter_weights}
    assert all(torch.equal(v, torch.full_like(v, 0.3)) for v in loaded.optimizer_state.values())
    assert info.path == path and info.as_tinker_json()["checkpoint_type"] == "training"


def test_flat_tensors_are_saved_as_is_and_load_as_standard_safetensors(ckpts, store):
    """A FlatTensors buffer is the file (no serialisation pass): safetensors reads it back exactly, mixed dtypes,
    scalars and empty tensors included, and the upload reads it part by part."""
    from artifact_store.flat_tensors import FlatTensors
    from artifact_store.object_store import _PartReader

    tensors = {"w.lora_A.weight": torch.randn(3, 5), "w.lora_A.weight.step": torch.tensor(7.0),
               "half": torch.randn(4).half(), "ids": torch.arange(6), "empty": torch.zeros(0, 2)}
    flat = FlatTensors.allocate({k: (t.shape, t.dtype) for k, t in tensors.items()})
    for name, tensor in tensors.items():
        flat[name].copy_(tensor)
    assert all(flat[k].untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr() for k in flat)
    for name, tensor in st_load(bytes(flat.file())).items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name])
    ckpt = _training_state(2.0)
    ckpt.optimizer_state = flat
    path = TinkerPath(RUN, "weights", "flat")
    info = ckpts.save(path, ckpt, base_model="tiny")
    assert store.get_bytes(f"{path.prefix}{info.version}/optimizer.safetensors") == bytes(flat.file())
    loaded = ckpts.load(path).optimizer_state
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    reader = _PartReader(flat.file())
    parts = [reader.read(16), reader.read(10**9), reader.read(16)]
    assert b"".join(parts) == bytes(flat.file()) and len(parts[0]) == 16 and parts[2] == b""


def test_overwrite_replaces_atomically_and_cleans_the_old_version(ckpts, store):
    path = TinkerPath(RUN, "sampler_weights", "latest")
    first = ckpts.save(path, _adapter(1.0), base_model="tiny")
    with pytest.raises(CheckpointExists):
        ckpts.save(path, _adapter(2.0), base_model="tiny")
    second = ckpts.save(path, _adapter(2.0), base_model="tiny", overwrite=True)
    assert second.version != first.version and ckpts.info(path).version == second.version
    assert float(ckpts.load(path).adapter_weights[next(iter(_adapter(0).adapter_weights))][0, 0]) == 2.0
    assert not any(first.version in key for key in store.list_keys(path.prefix))


def test_ttl_expiry_hides_and_sweeps_and_set_ttl_extends(ckpts, store):
    short = TinkerPath(RUN, "sampler_weights", "ephemeral-4")
    kept = TinkerPath(RUN, "sampler_weights", "kept")
    ckpts.save(short, _adapter(1.0), base_model="tiny", ttl_seconds=1)
    ckpts.save(kept, _adapter(1.0), base_model="tiny", ttl_seconds=1)
    assert ckpts.info(short).expires_at is not None
    ckpts.set_ttl(kept, None)  # keep forever
    time.sleep(1.2)
    with pytest.raises(CheckpointNotFound):
        ckpts.load(short)
    assert [i.path for i in ckpts.list_run(RUN)] == [kept]
    assert list(store.list_keys(short.prefix)) == []  # listing swept the expired checkpoint
    # An expired name can be saved again, without overwrite=True.
    ckpts.save(short, _adapter(5.0), base_model="tiny")
    assert ckpts.info(short).expires_at is None


def test_list_per_run_and_delete(ckpts):
    other_run = "sess-2:train:0"
    for name in ("a", "b"):
        ckpts.save(TinkerPath(RUN, "sampler_weights", name), _adapter(1.0), base_model="tiny")
    ckpts.save(TinkerPath(RUN, "weights", "a"), _training_state(1.0), base_model="tiny")
    ckpts.save(TinkerPath(other_run, "weights", "z"), _training_state(1.0), base_model="tiny")
    assert [str(i.path) for i in ckpts.list_run(RUN)] == [
        f"tinker://{RUN}/sampler_weights/a", f"tinker://{RUN}/sampler_weights/b", f"tinker://{RUN}/weights/a"]
    assert [i.path.name for i in ckpts.list_run(other_run)] == ["z"]
    assert ckpts.delete(TinkerPath(RUN, "sampler_weights", "a")) is True
    assert ckpts.delete(TinkerPath(RUN, "sampler_weights", "a")) is False
    with pytest.raises(CheckpointNotFound):
        ckpts.load(TinkerPath(RUN, "sampler_weights", "a"))
    assert [i.path.name for i in ckpts.list_run(RUN)] == ["b", "a"]


def test_load_detects_a_tampered_file(ckpts, store):
    path = TinkerPath(RUN, "sampler_weights", "tampered")
    info = ckpts.save(path, _adapter(1.0), base_model="tiny")
    store.put_bytes(f"{path.prefix}{info.version}/adapter_model.safetensors", b"not the weights")
    with pytest.raises(CheckpointCorrupt, match="checksum"):
        ckpts.load(path)


def test_readers_racing_an_overwriter_always_get_one_whole_version(ckpts):
    """Overwrites delete the previous version's files; a reader caught in between retries, never mixes."""
    path = TinkerPath(RUN, "sampler_weights", "hot")
    ckpts.save(path, _adapter(0.0), base_model="tiny")
    stop, errors, seen = threading.Event(), [], set()

    def overwrite() -> None:
        marker = 1.0
        while not stop.is_set():
            ckpts.save(path, _adapter(marker), base_model="tiny", overwrite=True)
            marker += 1

    writer = threading.Thread(target=overwrite)
    writer.start()
    try:
        for _ in range(40):
            try:
                loaded = ckpts.load(path)
            except Exception as exc:  # any failure is the bug this test looks for
                errors.append(exc)
                continue
            a, b = (loaded.adapter_weights[k] for k in sorted(loaded.adapter_weights))
            assert torch.equal(a, torch.full_like(a, float(a[0, 0]))) and torch.equal(b, -torch.full_like(b, a[0, 0]))
            seen.add(float(a[0, 0]))
    finally:
        stop.set()
        writer.join()
    assert errors == [] and len(seen) > 1


# ----------------------------------------------------------------------------- crash safety

_SAVER = textwrap.dedent("""
    import sys, time, torch
    from artifact_store import Checkpoint, CheckpointStore, MinioObjectStore, S3Config, TinkerPath
    endpoint, bucket, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    store = MinioObjectStore(S3Config(endpoint, "testing", "testing", bucket))
    writes = 0
    real_put = store.put_bytes
    def put_bytes(key, data, content_type="application/octet-stream"):
        global writes
        real_put(key, data, content_type)
        writes += 1
        if mode == "step":  # wait for the parent after every object write
            print("wrote", key, flush=True)
            sys.stdin.readline()
        elif mode.isdigit() and writes == int(mode):  # stop right after write N and wait to be killed
            print("wrote", key, flush=True)
            time.sleep(600)
    store.put_bytes = put_bytes
    ckpts = CheckpointStore(store)
    run = "crash:train:0"
    for i in range(1000000):
        marker = float(i + 1)
        weights = {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.full((2, 64), marker),
                   "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.full((64, 2), marker)}
        state = dict(step=i, kafka_offsets={"p0": i})
        ckpt = Checkpoint({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj"]},
                          weights, {k + ".exp_avg": v for k, v in weights.items()}, state)
        # The same names over and over: first saves and overwrites of a complete checkpoint alike.
        ckpts.save(TinkerPath(run, "weights", f"s{i % 2}"), ckpt, base_model="tiny", overwrite=True)
        ckpts.save(TinkerPath(run, "sampler_weights", f"s{i % 2}"), ckpt, base_model="tiny", overwrite=True)
        print("saved", i, flush=True)
""")
WRITES_PER_ROUND = 5 + 3  # training state: 4 files + manifest; sampler weights: 2 files + manifest


def _start_saver(settings, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _SAVER, settings.s3_endpoint, settings.bucket, mode], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdin.close()
    proc.stdout.close()


def _assert_everything_listed_loads(ckpts: CheckpointStore) -> int:
    listed = ckpts.list_run("crash:train:0")
    for info in listed:
        loaded = ckpts.load(info.path)  # verifies every checksum
        weights = list(loaded.adapter_weights.values())
        marker = float(weights[0][0, 0])
        assert all(torch.equal(w, torch.full_like(w, marker)) for w in weights), info.path
        if info.path.kind == "weights":
            assert loaded.state["step"] == int(marker) - 1
            assert all(torch.equal(v, torch.full_like(v, marker)) for v in loaded.optimizer_state.values())
    return len(listed)


def test_a_save_stopped_after_any_object_write_never_lists_a_broken_checkpoint(settings, ckpts):
    """The saver halts after every single object write; what it left is what a SIGKILL there leaves.
    Four rounds cover first saves and overwrites of both kinds, at every write boundary."""
    proc = _start_saver(settings, "step")
    try:
        for _ in range(4 * WRITES_PER_ROUND):
            line = proc.stdout.readline()
            while line.startswith("saved"):
                line = proc.stdout.readline()
            assert line.startswith("wrote"), f"saver stopped: {line!r}"
            _assert_everything_listed_loads(ckpts)
            proc.stdin.write("\n")
            proc.stdin.flush()
    finally:
        _kill(proc)
    assert _assert_everything_listed_loads(ckpts) == 4


# After writes 2 / 5 / 8: inside the first training save, its manifest, the first sampler manifest;
# 19 / 21: inside the overwrite of a complete training checkpoint, and right after its manifest.
LISTED_AFTER_WRITE = {2: 0, 5: 1, 8: 2, 19: 4, 21: 4}


@pytest.mark.parametrize("kill_after", sorted(LISTED_AFTER_WRITE))
def test_sigkill_between_object_writes_never_lists_a_broken_checkpoint(settings, ckpts, kill_after):
    proc = _start_saver(settings, str(kill_after))
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("wrote"):
            line = proc.stdout.readline()
        assert line, f"saver exited before write {kill_after}"
    finally:
        _kill(proc)
    assert _assert_everything_listed_loads(ckpts) == LISTED_AFTER_WRITE[kill_after]


def test_sigkill_at_random_times_never_lists_a_broken_checkpoint(settings, ckpts):
    rng = random.Random(1234)
    for _ in range(4):
        proc = _start_saver(settings, "fast")
        try:
            assert proc.stdout.readline().startswith("saved")  # imports done, saving in a loop
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            _kill(proc)
        _assert_everything_listed_loads(ckpts)
    assert _assert_everything_listed_loads(ckpts) == 4  # s0, s1 of both kinds


# ----------------------------------------------------------------------------- registry


def test_registry_documents(store):
    registry = Registry(store)
    assert registry.get_sampling_session("nope:sample:0") is None
    session = SamplingSession("s:sample:0", base_model="tiny", tenant="acme",
                              model_path=f"tinker://{RUN}/sampler_weights/ephemeral-4")
    registry.put_sampling_session(session)
    assert registry.get_sampling_session("s:sample:0") == session
    registry.put_run(TrainingRun(model_id=RUN, base_model="tiny", tenant="acme", lora=LoraSpec(rank=8)))
    registry.put_run(TrainingRun(model_id="other:train:0", base_model="tiny", tenant="zed", lora=LoraSpec(rank=4)))
    assert [r.model_id for r in registry.list_runs(tenant="acme")] == [RUN]
    assert registry.get_run(RUN).lora_rank == 8


def test_a_run_record_written_with_flat_lora_fields_still_reads(store):
    old = {"model_id": RUN, "base_model": "tiny", "tenant": "acme", "lora_rank": 8, "train_attn": True,
           "train_mlp": False, "train_unembed": False, "session_id": None, "user_metadata": {"k": 1},
           "created_at": 1.0, "last_request_time": 2.0, "unloaded": False}
    store.put_bytes(f"runs/{RUN}/run.json", json.dumps(old).encode())
    run = Registry(store).get_run(RUN)
    assert run is not None and run.lora == LoraSpec(rank=8, train_mlp=False, train_unembed=False)
    assert (run.user_metadata, run.created_at) == ({"k": 1}, 1.0)
