"""docker-compose.yml and the Dockerfile, checked as files (no Docker engine needed)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LORAFLEET = ("dispatcher", "dashboard")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def workers(c: dict) -> dict[str, dict]:
    return {n: s for n, s in c["services"].items() if n.startswith("worker-gpu")}


def env(service: dict) -> dict[str, str]:
    e = service.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) for item in e)
    return {k: str(v) for k, v in e.items()}


def test_services_and_volumes():
    c = compose()
    assert {"redis", "dispatcher", "dashboard", "worker-gpu0", "worker-gpu1"} <= set(c["services"])
    assert {"data", "redis"} <= set(c["volumes"])


def test_redis_is_the_official_image_with_append_only_persistence_on_a_volume():
    redis = compose()["services"]["redis"]
    assert redis["image"].split(":")[0] in ("redis", "docker.io/library/redis")
    cmd = redis["command"]
    cmd = cmd if isinstance(cmd, list) else cmd.split()
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[0] == "redis" and v.split(":")[1] == "/data"
               for v in redis["volumes"])


def test_every_lorafleet_service_shares_the_data_volume_and_redis():
    c = compose()
    for name in (*LORAFLEET, *workers(c)):
        s = c["services"][name]
        assert "data:/data" in s["volumes"], name
        e = env(s)
        assert e["LORAFLEET_HOME"] == "/data", name
        assert e["LORAFLEET_REDIS_URL"] == "redis://redis:6379/0", name
        assert "redis" in s["depends_on"], name


def test_commands():
    c = compose()["services"]
    assert c["dispatcher"]["command"] == ["python", "-m", "dispatcher"]
    assert c["dashboard"]["command"] == ["python", "-m", "dashboard"]
    for name, s in workers(compose()).items():
        assert s["command"][:3] == ["python", "-m", "gpuworker.worker"], name


def test_dashboard_listens_on_all_interfaces_and_publishes_8765():
    d = compose()["services"]["dashboard"]
    assert env(d)["LORAFLEET_HOST"] == "0.0.0.0"
    assert any(str(p).endswith("8765:8765") for p in d["ports"])


def test_each_worker_reserves_its_own_card_and_pins_cuda():
    ws = workers(compose())
    assert len(ws) >= 2
    cards, names = [], []
    for name, s in ws.items():
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        assert len(dev["device_ids"]) == 1, name
        card = str(dev["device_ids"][0])
        assert name == f"worker-gpu{card}", name
        cards.append(card)
        e = env(s)
        # The container sees only its reserved card, as device 0.
        assert e["CUDA_VISIBLE_DEVICES"] == "0", name
        assert e["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID", name
        cmd = s["command"]
        assert cmd[cmd.index("--gpu") + 1] == "0", name
        names.append(cmd[cmd.index("--name") + 1])
    assert len(set(cards)) == len(cards), cards  # every worker pins a distinct card
    assert len(set(names)) == len(names), names  # and has its own worker name


def test_dockerfile_installs_torch_first_then_the_worker_and_gpu_extras():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM python:") and "slim" in lines[0]
    torch_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and "torch" in ln)
    project_at = next(i for i, ln in enumerate(lines) if 'pip install ".[worker,gpu]"' in ln)
    assert torch_at < project_at
    assert "8765" in text
