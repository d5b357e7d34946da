"""artifact_store's side of sharing checkpoints, on real S3 (moto) and on the in-memory store: external_weights
checkpoints, publication, store-side copies, chunked reads, and the signed grants inside download URLs."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load as st_load

from artifact_store import Checkpoint, CheckpointNotFound, CheckpointStore, MemoryObjectStore, TinkerPath
from artifact_store.signed_urls import ExpiredToken, Grant, InvalidToken, UrlSigner, derive_key

RUN = "sess-1:train:0"
OTHER_RUN = "sess-2:train:0"


def _adapter(marker: float) -> Checkpoint:
    weights = {"base_model.model.lm_head.lora_A.weight": torch.full((2, 8), marker),
               "base_model.model.lm_head.lora_B.weight": torch.full((8, 2), -marker)}
    return Checkpoint(adapter_config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lm_head"]},
                      adapter_weights=weights)


@pytest.fixture(params=["s3", "memory"])
def ckpts(request) -> CheckpointStore:
    if request.param == "memory":
        return CheckpointStore(MemoryObjectStore())
    return CheckpointStore(request.getfixturevalue("store"))


def test_external_weights_are_a_peft_adapter_listed_as_external(ckpts):
    path = TinkerPath.parse(f"tinker://{RUN}/external_weights/download")
    info = ckpts.save(path, _adapter(3.0), base_model="tiny")
    assert set(info.files) == {"adapter_config.json", "adapter_model.safetensors"}  # no optimizer, no state
    listed = ckpts.list_run(RUN)
    assert [i.path for i in listed] == [path]
    out = listed[0].as_tinker_json()
    assert (out["checkpoint_type"], out["checkpoint_id"], out["base_model"], out["public"]) == (
        "external", "external_weights/download", "tiny", False)
    assert torch.equal(ckpts.load(path).adapter_weights["base_model.model.lm_head.lora_A.weight"],
                       torch.full((2, 8), 3.0))


def test_publication_is_listed_revoked_and_dies_with_the_checkpoint(ckpts):
    mine = TinkerPath(RUN, "sampler_weights", "final")
    private = TinkerPath(RUN, "weights", "step-1")
    theirs = TinkerPath(OTHER_RUN, "sampler_weights", "final")
    for path in (mine, private, theirs):
        ckpts.save(path, _adapter(1.0), base_model="tiny")
    assert ckpts.publications.publish(mine) is True
    assert ckpts.publications.publish(mine) is False  # already public
    assert ckpts.publications.publish(theirs) is True
    assert ckpts.publications.published() == {mine, theirs}
    assert ckpts.publications.published(RUN) == {mine}
    assert {str(i.path): i.public for i in ckpts.list_run(RUN)} == {str(mine): True, str(private): False}
    assert ckpts.info(mine, with_public=True).public and not ckpts.info(mine).public  # only when asked for
    assert ckpts.publications.unpublish(theirs) is True and ckpts.publications.unpublish(theirs) is False
    assert not ckpts.info(theirs, with_public=True).public
    ckpts.delete(mine)
    assert ckpts.publications.published() == set()
    ckpts.save(mine, _adapter(2.0), base_model="tiny")  # a new checkpoint at the same path starts private
    assert not ckpts.info(mine, with_public=True).public


def test_copy_is_a_checkpoint_of_its_own(ckpts):
    source = TinkerPath(RUN, "weights", "step-1")
    ckpt = _adapter(5.0)
    ckpt.optimizer_state = {"m": torch.ones(3)}
    ckpt.state = {"step": 7}
    src_info = ckpts.save(source, ckpt, base_model="tiny", ttl_seconds=60, user_metadata={"k": "v"})
    copy = TinkerPath(OTHER_RUN, "weights", "step-1")
    info = ckpts.copy(source, copy, ttl_seconds=7200)
    assert info.files == src_info.files and info.version != src_info.version
    assert info.user_metadata == {"k": "v"} and info.base_model == "tiny"
    assert info.expires_at is not None and info.expires_at > time.time() + 3600  # its own TTL, not the source's
    assert ckpts.copy(source, copy).expires_at is None  # a retried copy overwrites, same bytes
    ckpts.delete(source)
    loaded = ckpts.load(copy)  # verified against the copied checksums
    assert loaded.state == {"step": 7} and torch.equal(loaded.optimizer_state["m"], torch.ones(3))
    with pytest.raises(CheckpointNotFound):
        ckpts.copy(source, TinkerPath(OTHER_RUN, "weights", "again"))


def test_file_key_names_one_version_and_read_chunks_streams_it(ckpts):
    path = TinkerPath(RUN, "sampler_weights", "s")
    info = ckpts.save(path, _adapter(4.0), base_model="tiny")
    key = ckpts.file_key(info, "adapter_model.safetensors")
    data = b"".join(ckpts.objects.read_chunks(key, chunk_bytes=100))
    assert len(data) == info.files["adapter_model.safetensors"]
    assert torch.equal(st_load(data)["base_model.model.lm_head.lora_A.weight"], torch.full((2, 8), 4.0))
    assert len(list(ckpts.objects.read_chunks(key, chunk_bytes=100))) > 1
    with pytest.raises(CheckpointNotFound):
        ckpts.file_key(info, "optimizer.safetensors")
    newer = ckpts.save(path, _adapter(6.0), base_model="tiny", overwrite=True)
    assert ckpts.file_key(newer, "adapter_model.safetensors") != key
    with pytest.raises(FileNotFoundError):  # the overwritten version is gone
        b"".join(ckpts.objects.read_chunks(key))


def test_signed_grants_verify_only_unaltered_unexpired_and_from_the_same_key():
    signer = UrlSigner(derive_key("s3-secret"))
    grant = Grant(key="runs/a/external_weights/x/v-1/adapter_model.safetensors",
                  tinker_path="tinker://a/external_weights/x", tenant="alice", expires_at=int(time.time()) + 60)
    token = signer.sign(grant)
    assert signer.verify(token, "GET") == grant
    assert UrlSigner(derive_key("s3-secret")).verify(token, "GET") == grant  # another gateway of the deployment
    with pytest.raises(InvalidToken, match="signature"):
        UrlSigner(derive_key("another-secret")).verify(token, "GET")
    body, mac = token.split(".")
    forged = signer.sign(Grant(grant.key, grant.tinker_path, "mallory", grant.expires_at)).split(".")[0]
    with pytest.raises(InvalidToken, match="signature"):
        signer.verify(f"{forged}.{mac}", "GET")  # someone else's grant under this signature
    with pytest.raises(InvalidToken):
        signer.verify(body, "GET")
    with pytest.raises(ExpiredToken, match="expired"):
        signer.verify(token, "GET", now=grant.expires_at + 1)
    with pytest.raises(InvalidToken, match="grants GET, not PUT"):  # a download URL never uploads
        signer.verify(token, "PUT")
    with pytest.raises(ValueError, match="16 bytes"):
        UrlSigner(b"short")
