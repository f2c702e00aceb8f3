"""The README's pictures can be made again (issue 11, point 22): scripts/screenshots.py starts a
real fleet with `lorafleet up`, drives the dashboard in headless Chromium and writes the Job, Sweep
and Fleet pages as PNGs, each shot only once its page shows what it is for. Here on the tiny
model, so it runs in seconds; the README's pictures come from the demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleetproc import ROOT
from tests.tiny import make_tiny_model, write_tiny_dataset

pytestmark = pytest.mark.browser

sys.path.insert(0, str(ROOT / "scripts"))
import screenshots  # noqa: E402


@pytest.mark.timeout(480)  # the script's own limit is 300 s, its subprocess's 420 s
def test_script_shoots_the_three_pages_of_a_real_fleet(tmp_path):
    home = tmp_path / "data"
    make_tiny_model(home / "models" / "tiny")
    write_tiny_dataset(home / "datasets" / "tiny.json", n=40)
    write_tiny_dataset(home / "datasets" / "tiny-eval.json", n=4)
    (home / "datasets" / "story.txt").write_text("The sea is wide and deep. " * 60)
    out = tmp_path / "docs"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshots.py"), "--out", str(out),
         "--home", str(home), "--model", "tiny", "--dataset", "tiny", "--eval-dataset",
         "tiny-eval", "--text-file", "story.txt", "--cutoff-len", "64", "--epochs", "2",
         "--timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("job.png", "sweep.png", "fleet.png"):
        w, h = screenshots.png_size(out / name)
        assert w == screenshots.VIEWPORT["width"] and 200 <= h <= screenshots.VIEWPORT["height"]
        assert 5_000 < (out / name).stat().st_size < 400_000, name
    assert "3 pictures" in res.stdout
    # Nothing it started is left running: no process has this data folder in its environment.
    assert not _processes_of(home)


def _processes_of(home) -> list[int]:
    mark = f"LORAFLEET_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile, or another user's (then not ours either)
                pass
    return found


def test_png_size_refuses_what_is_not_a_png(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"GIF89a" + b"\0" * 30)
    with pytest.raises(screenshots.Failed, match="is not a PNG"):
        screenshots.png_size(bad)
