"""Make the README's pictures of the dashboard again: the Job page with its live charts, the
Sweep page and the Fleet page, shot in headless Chromium from a real fleet on the demo model.

    .venv/bin/python scripts/screenshots.py            # writes docs/job.png, sweep.png, fleet.png

It starts `lorafleet up --gpus cpu` on a throwaway data folder (made with `lorafleet init`, so the
demo model and sample data are there; or `--home DIR` for a folder you made), submits a training
job and a three-trial sweep with the CLI, and shoots each page only once it shows what the
picture is for: the job's loss and evaluation curves while it runs, the Fleet page while the
worker trains a trial, and the Sweep page once every trial is measured. Everything it started is
stopped at the end. On the demo model it takes about five minutes on two CPU cores.

It needs what `scripts/setup.sh --test` installs (Playwright, and Debian's Chromium package).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dispatcher.host.embedded import free_port  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1180, "height": 860}
# The pages' own colours for the curves (dashboard/static/charts.js): a drawn curve is a canvas
# with enough pixels of that colour.
DRAWN = """([selector, rgb]) => {
  const canvas = document.querySelector(selector + " canvas");
  if (!canvas || !canvas.width) return 0;
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 200 && Math.abs(d[i] - rgb[0]) < 40 && Math.abs(d[i + 1] - rgb[1]) < 40
        && Math.abs(d[i + 2] - rgb[2]) < 40) n++;
  return n;
}"""
LOSS_BLUE = [37, 99, 235]
# Any curve of any colour: pixels far from grey (the axes, grid and text are grey or black).
COLOURED = """(selector) => {
  const canvas = document.querySelector(selector + " canvas");
  if (!canvas || !canvas.width) return 0;
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 200 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 80) n++;
  return n;
}"""


class Failed(RuntimeError):
    """The fleet or a page did not get to what a picture needs; the message says what."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs (docs/)")
    p.add_argument("--home", type=Path, help="a prepared data folder to use (default: a new "
                   "throwaway one made with `lorafleet init`); the run adds LoRAs named shots-* "
                   "(replacing any of those names) and a .config folder to it")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="base model (a folder name)")
    p.add_argument("--dataset", default="alpaca-sample", help="training dataset")
    p.add_argument("--eval-dataset", default="alpaca-heldout", help="evaluation dataset")
    p.add_argument("--text-file", default="raw-sample", help="text file the sweep's trials are "
                   "measured on (perplexity)")
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--epochs", type=float, default=2, help="epochs of the job (the sweep's "
                   "trials train half as long)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--chromium", default=os.environ.get("LORAFLEET_CHROMIUM")
                   or shutil.which("chromium") or "/usr/bin/chromium")
    return p.parse_args(argv)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (it is a PNG, or this raises)."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise Failed(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


class Fleet:
    """`lorafleet up --gpus cpu` on one data folder, and the CLI against it."""

    def __init__(self, home: Path, log: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.pop("LORAFLEET_REDIS_URL", None)
        self.env.pop("LORAFLEET_URL", None)
        self.env.update({"LORAFLEET_HOME": str(home), "LORAFLEET_PORT": str(self.port),
                         "LORAFLEET_EMBEDDED_REDIS_PORT": str(free_port()),
                         "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                         "XDG_CONFIG_HOME": str(home / ".config")})
        self.log = log
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, timeout: float = 120) -> str:
        res = subprocess.run([sys.executable, "-m", "dispatcher.cli", *args, "--url", self.url],
                             env=self.env, cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise Failed(f"lorafleet {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
        return res.stdout

    def init(self) -> None:
        res = subprocess.run([sys.executable, "-m", "dispatcher.cli", "init"], env=self.env,
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise Failed(f"lorafleet init failed:\n{res.stdout}{res.stderr}")

    def up(self, timeout: float = 120) -> str:
        """Start everything; return the printed URL that logs a browser in."""
        with open(self.log, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.cli", "up", "--gpus", "cpu"], env=self.env,
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        pattern = re.compile(re.escape(self.url) + r"/\?token=\S+")
        found = wait_for(lambda: pattern.search(self.log.read_text()), timeout,
                         "the dashboard's URL from `lorafleet up`", self)
        return found.group(0)

    def stop(self) -> None:
        """Ctrl-C to `lorafleet up` (it stops its children), then kill whatever of its session
        is left, also when `up` itself died first."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # the session's stragglers, if any
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            print(f"screenshots: `lorafleet up` (pid {self.proc.pid}) did not stop",
                  file=sys.stderr)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def wait_for(pred: Callable[[], Any], timeout: float, what: str, fleet: Fleet | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet and fleet.proc and fleet.proc.poll() is not None:
            raise Failed(f"`lorafleet up` exited while waiting for {what}:\n"
                         f"{fleet.log.read_text()[-3000:]}")
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise Failed(f"timed out waiting for {what}")


def job_spec(a: argparse.Namespace, name: str, epochs: float) -> dict[str, Any]:
    return {"lora_name": name, "base_model": a.model, "dataset": a.dataset,
            "eval_dataset": a.eval_dataset, "format": "alpaca-format", "lora_rank": 8,
            "lora_alpha": 16, "micro_batch_size": 2, "batch_size": 2, "epochs": epochs,
            "learning_rate": "3e-4", "cutoff_len": a.cutoff_len, "warmup_steps": 4,
            "eval_steps": 6, "always_override": True}


def shoot(page: Any, path: Path, what: str) -> None:
    """The viewport, cut off below the page's content (the Fleet page of one worker is short)."""
    page.wait_for_timeout(400)  # let the last redraw settle
    bottom = page.evaluate("() => Math.ceil(Math.max(...[...document.body.children]"
                           ".map(e => e.getBoundingClientRect().bottom)))")
    height = max(200, min(VIEWPORT["height"], bottom + 24))
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": VIEWPORT["width"],
                                          "height": height})
    w, h = png_size(path)
    print(f"  {path.name}: {what}, {w}x{h}, {path.stat().st_size // 1024} KB")


def wait_page(page: Any, js: str, timeout_s: float, what: str) -> None:
    try:
        page.wait_for_function(js, timeout=timeout_s * 1000, polling=500)
    except Exception as e:  # Playwright's TimeoutError: say which picture could not be made
        page.screenshot(path=str(Path(tempfile.gettempdir()) / "lorafleet-shots-failed.png"))
        raise Failed(f"{page.url} never showed {what} ({type(e).__name__}); the page as it "
                     f"was: {tempfile.gettempdir()}/lorafleet-shots-failed.png") from e


def shoot_job(page: Any, fleet: Fleet, a: argparse.Namespace, work: Path, path: Path,
              timeout: float) -> None:
    """The Job page while the job trains: loss and evaluation curves drawn, still running."""
    spec = work / "job.json"
    spec.write_text(json.dumps(job_spec(a, "shots-demo", a.epochs)))
    job = fleet.cli("submit", str(spec)).split()[-1]
    print(f"==> job {job}")
    page.goto(f"{fleet.url}/jobs/{job}")
    wait_page(page, "() => { const c = document.querySelector(\"[data-testid='loss-chart']\");"
              " return c && Number(c.dataset.points) >= 14 && Number(c.dataset.evalPoints) >= 2; }",
              timeout, "the job's loss and evaluation curves")
    wait_page(page, f"() => ({DRAWN})([\"[data-testid='loss-chart']\", {LOSS_BLUE}]) > 50",
              30, "a drawn loss curve")
    shoot(page, path, "Job page, training")
    try:  # the picture is taken; the job need not train on
        fleet.cli("cancel", job)
    except Failed as e:
        if "nothing to cancel" not in str(e):  # it ended by itself
            raise


def start_sweep(fleet: Fleet, a: argparse.Namespace, work: Path) -> str:
    """Four trials (rank x learning rate), each measured on the text file afterwards."""
    sweep_file = work / "sweep.json"
    sweep_file.write_text(json.dumps({
        "name": "rank-lr", "base": job_spec(a, "shots-sweep", a.epochs / 2),
        "parameters": {"lora_rank": [4, 16], "learning_rate": ["1e-4", "1e-3"]},
        "method": "grid", "evaluate": {"text_file": a.text_file, "stride": a.cutoff_len,
                                       "max_length": a.cutoff_len}}))
    sweep = fleet.cli("sweep", str(sweep_file)).split()[-1]
    print(f"==> sweep {sweep}")
    return sweep


def shoot_fleet(page: Any, fleet: Fleet, path: Path, timeout: float) -> None:
    """The Fleet page while the worker trains one of the sweep's trials."""
    page.goto(f"{fleet.url}/fleet")
    wait_page(page, "() => [...document.querySelectorAll(\"[data-testid='worker-row']\")]"
              ".some(r => /shots-sweep/.test(r.querySelector(\"[data-col='job']\").innerText))",
              timeout, "a worker training a trial")
    shoot(page, path, "Fleet page")


def shoot_sweep(page: Any, fleet: Fleet, sweep: str, path: Path, timeout: float) -> None:
    """The Sweep page once every trial is measured."""
    page.goto(f"{fleet.url}/sweeps/{sweep}")
    wait_page(page, "() => document.querySelector(\"[data-testid='sweep-page']\")"
              ".dataset.state === 'finished'", timeout, "the sweep finished")
    # The trials' curves have colours of their own, and one may hide another: any colour counts.
    wait_page(page, f"() => ({COLOURED})(\"[data-testid='sweep-chart']\") > 100",
              30, "the sweep's curves")
    shoot(page, path, "Sweep page, finished")


def run(a: argparse.Namespace) -> list[Path]:
    from playwright.sync_api import sync_playwright

    if not Path(a.chromium).exists():
        raise Failed(f"Chromium not found at {a.chromium}: `scripts/setup.sh --test` installs it")
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-shots-"))
    fleet = Fleet(a.home or work / "data", work / "up.log")
    started = time.monotonic()
    left = lambda: max(10.0, a.timeout - (time.monotonic() - started))  # noqa: E731
    # Written beside the run and moved together at the end: a failed run leaves docs/ as it was.
    shots = [work / "job.png", work / "sweep.png", work / "fleet.png"]
    try:
        if a.home is None:
            print("==> lorafleet init (the demo model and the sample data)")
            fleet.init()
        print("==> lorafleet up --gpus cpu")
        login = fleet.up()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=a.chromium, headless=True,
                                        args=CHROMIUM_ARGS)
            page = browser.new_context(viewport=VIEWPORT, device_scale_factor=1).new_page()
            page.goto(login)
            shoot_job(page, fleet, a, work, shots[0], left())
            sweep = start_sweep(fleet, a, work)
            shoot_fleet(page, fleet, shots[2], left())
            shoot_sweep(page, fleet, sweep, shots[1], left())
            browser.close()
        done = [a.out / p.name for p in shots]
        for src, dst in zip(shots, done, strict=True):
            shutil.move(src, dst)
        return done
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        shots = run(a)
    except Failed as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in shots)
    print(f"==> {len(shots)} pictures in {a.out} ({total // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
