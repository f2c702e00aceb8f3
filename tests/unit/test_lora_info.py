"""What a LoRA name holds, said before a job writes it (dispatcher/jobs/lora_info.py), on a real
Redis: the line for an existing LoRA, someone else's name, and the free name proposed."""

from __future__ import annotations

import json

import pytest
import redis

from dispatcher.access.owners import Actor, Owners
from dispatcher.jobs.lora_info import free_name, lora_info, notice


@pytest.fixture
def owners(redis_server, prefix):
    return Owners(redis.Redis.from_url(redis_server, decode_responses=True), prefix)


def _lora(loras, name, rank=8, steps=15):
    d = loras / name
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    (d / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (d / "training_log.json").write_text(json.dumps({"current_steps": steps}))


def test_an_existing_lora_of_mine_is_continued(tmp_path, owners):
    _lora(tmp_path, "mine")
    owners.record("loras/mine", "ana")
    info = lora_info(tmp_path, "mine", owners)
    assert (info.exists, info.rank, info.steps, info.owner) == (True, 8, 15, "ana")
    ana = Actor("ana", False)
    assert notice(info, ana, False) == (
        "a LoRA of this name exists (rank 8, 15 steps): it will be continued — rename it, "
        "or tick always_override to start over")
    assert "backup folder" in notice(info, ana, True)
    assert notice(lora_info(tmp_path, "new-one", owners), ana, False) == ""


def test_someone_elses_name_is_said_to_be_theirs(tmp_path, owners):
    _lora(tmp_path, "theirs")
    owners.record("loras/theirs", "bo")
    line = notice(lora_info(tmp_path, "theirs", owners), Actor("ana", False), False)
    assert line.startswith("loras/theirs belongs to bo") and "choose another lora_name" in line
    owners.record("loras/claimed", "bo")  # a queued job of bo's will make it
    assert "belongs to bo" in notice(lora_info(tmp_path, "claimed", owners),
                                     Actor("ana", False), False)
    admin = notice(lora_info(tmp_path, "theirs", owners), Actor("root", True), False)
    assert "(it belongs to bo): it will be continued" in admin


def test_free_name_skips_folders_and_claims(tmp_path, owners):
    _lora(tmp_path, "run")
    _lora(tmp_path, "run-2")
    owners.record("loras/run-3", "bo")
    assert free_name(tmp_path, "run", owners) == "run-4"
    assert free_name(tmp_path, "run-2", owners) == "run-4"
    assert free_name(tmp_path, "x-7", owners) == "x-8"
    with pytest.raises(ValueError):
        lora_info(tmp_path, "../up", owners)
