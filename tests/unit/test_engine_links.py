"""The engine on a real tiny Llama with links in the LoRA folder: continuing copies a link as a
link (never the file it points to), the next lora.zip leaves it out, a LoRA folder that is a
link is refused before anything is written or moved, and evaluation / generation refuse a LoRA
linked to outside the data folder."""

from __future__ import annotations

import io
import os
import zipfile

import pytest

from dashboard.lora_zip import stream_zip
from gpuworker.engine import EngineError
from gpuworker.engine.evaluate import perplexity
from gpuworker.engine.generate import generate
from tests.unit.test_engine import Recorder, make_spec, paths, tiny_model_dir  # noqa: F401

SECRET = "root:x:0:0:the secret line of a file outside the data folder\n"


def zip_names(folder) -> dict[str, bytes]:
    data = b"".join(stream_zip(folder, folder.name, with_checkpoints=True))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_continuing_never_copies_a_linked_file_into_the_backup(paths, tmp_path):  # noqa: F811
    outside = tmp_path / "passwd"
    outside.write_text(SECRET)
    Recorder().run(make_spec(), paths)
    lora_dir = paths.loras / "tiny-lora"
    os.symlink(outside, lora_dir / "passwd")
    Recorder().run(make_spec(), paths)  # continue: a backup copy of the earlier files
    backup = next(p for p in lora_dir.iterdir() if p.name.startswith("backup-"))
    kept = backup / "passwd"
    assert kept.is_symlink() and os.readlink(kept) == str(outside)
    files = zip_names(lora_dir)
    assert "tiny-lora/adapter_model.safetensors" in files
    assert not any(SECRET.encode() in data for data in files.values())
    assert not any(name.endswith("passwd") for name in files)


@pytest.mark.parametrize("override", [False, True])
def test_a_lora_folder_linked_outside_is_refused_and_untouched(paths, tmp_path,  # noqa: F811
                                                               override):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "unrelated.txt").write_text("someone's file\n")
    os.symlink(outside, paths.loras / "tiny-lora")
    with pytest.raises(EngineError, match="loras/tiny-lora is a link"):
        Recorder().run(make_spec(always_override=override), paths)
    assert sorted(p.name for p in outside.iterdir()) == ["unrelated.txt"]


def test_a_link_inside_loras_to_another_lora_is_not_written_through(paths):  # noqa: F811
    Recorder().run(make_spec(lora_name="ana-lora"), paths)
    before = {p.name: p.stat().st_mtime_ns for p in (paths.loras / "ana-lora").iterdir()}
    os.symlink(paths.loras / "ana-lora", paths.loras / "bo-lora")
    with pytest.raises(EngineError, match="loras/bo-lora is a link"):
        Recorder().run(make_spec(lora_name="bo-lora", always_override=True), paths)
    assert {p.name: p.stat().st_mtime_ns for p in (paths.loras / "ana-lora").iterdir()} == before


def test_evaluation_and_generation_refuse_a_lora_linked_outside(paths, tmp_path):  # noqa: F811
    Recorder().run(make_spec(), paths)
    outside = tmp_path / "out-lora"
    (paths.loras / "tiny-lora").rename(outside)
    os.symlink(outside, paths.loras / "out-lora")
    rec = Recorder()
    with pytest.raises(EngineError, match="loras/out-lora is a link that leads outside"):
        perplexity(base_model="tiny", loras=["out-lora"], text_file="story.txt", paths=paths,
                   stride=32, max_length=64, precision="fp32", progress=rec.progress,
                   should_stop=rec.should_stop, log=rec.lines.append, device="cpu")
    with pytest.raises(EngineError, match="loras/out-lora is a link that leads outside"):
        generate(base_model="tiny", lora="out-lora", prompt="hi", format_file=None,
                 paths=paths, max_new_tokens=2, temperature=0.0, top_p=1.0, seed=0,
                 precision="fp32", progress=rec.progress, should_stop=rec.should_stop,
                 log=rec.lines.append, device="cpu")


def test_an_adapter_file_linked_outside_is_not_loaded(paths, tmp_path):  # noqa: F811
    Recorder().run(make_spec(), paths)
    lora_dir = paths.loras / "tiny-lora"
    moved = tmp_path / "adapter_model.safetensors"
    (lora_dir / "adapter_model.safetensors").rename(moved)
    os.symlink(moved, lora_dir / "adapter_model.safetensors")
    with pytest.raises(EngineError, match="adapter_model.safetensors is a link that leads"):
        Recorder().run(make_spec(), paths)


def test_a_folder_swapped_for_a_link_during_training_is_not_written_through(paths,  # noqa: F811
                                                                             tmp_path):
    """loras/<name> replaced by a link to a folder outside the data folder while the run
    trains (after every check at its start): the next checkpoint and the final save check
    again, so the run ends with an error naming the link and writes nothing outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = paths.loras / "tiny-lora"
    rec = Recorder()
    swapped: list[bool] = []

    def progress(event: dict) -> None:
        rec.progress(event)
        if event.get("type") == "train" and event.get("step") == 1 and not swapped:
            folder.rename(paths.loras / ".moved-away")
            folder.symlink_to(outside)
            swapped.append(True)

    from gpuworker.engine.boundary import train

    with pytest.raises(EngineError, match="loras/tiny-lora is a link, not a folder"):
        train(make_spec(epochs=1, save_steps=2), paths, progress, rec.should_stop,
              rec.lines.append, device="cpu", job_id="j1")
    assert swapped and list(outside.iterdir()) == []
