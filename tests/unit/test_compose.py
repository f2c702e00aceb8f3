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


def redis_script() -> str:
    """The redis service's start script, as compose hands it to sh ($$ is compose's $)."""
    cmd = compose()["services"]["redis"]["command"]
    assert cmd[:2] == ["sh", "-c"], cmd
    return cmd[2].replace("$$", "$")


PASSWORD_REF = "${REDIS_PASSWORD:?"


def test_redis_is_the_official_image_with_append_only_persistence_on_a_volume():
    redis = compose()["services"]["redis"]
    assert redis["image"].split(":")[0] in ("redis", "docker.io/library/redis")
    start = redis_script().splitlines()[-1].split()
    assert start[:3] == ["exec", "docker-entrypoint.sh", "redis-server"]
    assert start[start.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[0] == "redis" and v.split(":")[1] == "/data"
               for v in redis["volumes"])


def test_redis_gets_a_password_that_compose_refuses_to_start_without():
    redis = compose()["services"]["redis"]
    assert env(redis)["REDIS_PASSWORD"].startswith(PASSWORD_REF)
    # Never on a command line: only the shell's variable, expanded by its printf builtin.
    script = redis_script()
    assert "--requirepass" not in script and '"$REDIS_PASSWORD"' in script


def test_redis_start_script_really_starts_a_private_server(tmp_path):
    """The compose start script, run by sh with the image's entrypoint standing in (it execs
    the embedded redis-server on a free port): clients without the password are refused and the
    renamed commands are gone."""
    import os
    import socket
    import stat
    import subprocess
    import time

    import redis as redis_lib

    from dispatcher.host.embedded import free_port, server_binary

    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entry = bin_dir / "docker-entrypoint.sh"
    entry.write_text(f'#!/bin/sh\nshift\nexec {server_binary()} "$@" --port {port} '
                     "--bind 127.0.0.1\n")
    entry.chmod(0o755)
    work = tmp_path / "data"
    work.mkdir()
    proc = subprocess.Popen(["sh", "-c", redis_script()], cwd=work,
                            env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                 "REDIS_PASSWORD": "compose-pw"})
    try:
        r = redis_lib.Redis(port=port, password="compose-pw")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert r.ping()
                break
            except redis_lib.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
            assert b"NOAUTH" in s.recv(200)
        for command in ("CONFIG", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF", "MIGRATE"):
            try:
                r.execute_command(command, "x")
                raise AssertionError(f"{command} answered")
            except redis_lib.ResponseError as e:
                assert "unknown command" in str(e)
        assert stat.S_IMODE((work / "lorafleet-redis.conf").stat().st_mode) == 0o600
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"compose-pw" not in f.read()
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_lorafleet_service_shares_the_data_volume_and_redis():
    c = compose()
    for name in (*LORAFLEET, *workers(c)):
        s = c["services"][name]
        assert "data:/data" in s["volumes"], name
        e = env(s)
        assert e["LORAFLEET_HOME"] == "/data", name
        url = e["LORAFLEET_REDIS_URL"]
        assert url.startswith("redis://:" + PASSWORD_REF) and url.endswith("}@redis:6379/0"), name
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


def test_the_env_file_with_the_redis_password_stays_out_of_git_and_images():
    assert "/.env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
