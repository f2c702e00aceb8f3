"""scripts/setup.sh (run by scripts/up.sh) installs lorafleet editable without setuptools'
"Editable installation" block of stars in its output (issue 11, point 21): the environment it
sets for that pip call, taken from the script, silences the block that the same call shows
without it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv

import pytest

from tests.fleetproc import ROOT

pytestmark = pytest.mark.integration


def _editable_env() -> dict[str, str]:
    m = re.search(r'^EDITABLE_ENV=\(env "([A-Z_]+)=([^"]*)"\)$',
                  (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert m, "setup.sh no longer sets EDITABLE_ENV"
    return {m.group(1): m.group(2)}


def _editable_install(tmp_path, env_over: dict[str, str]) -> str:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info",
                                                              "__pycache__", "build"))
    target = tmp_path / "venv"
    if not target.exists():
        venv.create(target, with_pip=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(env_over)
    res = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python",
                          str(target / "bin" / "python"), "install", "--quiet", "--no-deps",
                          "-e", "."], cwd=src, env=env, capture_output=True, text=True,
                         timeout=300)
    shutil.rmtree(src)
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr


def test_the_editable_install_is_quiet(tmp_path):
    env = _editable_env()
    assert env == {"PYTHONWARNINGS": "ignore:Editable installation"}
    loud = _editable_install(tmp_path, {})
    if "Editable installation" not in loud:
        pytest.skip("this pip/setuptools shows no editable-install block to silence")
    quiet = _editable_install(tmp_path, env)
    assert "Editable installation" not in quiet and "****" not in quiet, quiet
