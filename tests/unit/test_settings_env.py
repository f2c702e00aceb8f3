"""dispatcher/settings.py reads the environment for every module: each reader takes the
environment as a mapping, so these tests hand in their own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispatcher import settings as st


def test_settings_from_env_knows_whether_the_home_was_given(tmp_path):
    assert st.Settings.from_env({"LORAFLEET_HOME": str(tmp_path)}).home_given
    assert not st.Settings.from_env({}).home_given


def test_the_cli_and_dashboard_readers():
    env = {"LORAFLEET_URL": "http://h:1", "LORAFLEET_TOKEN": "lf_x", "CUDA_VISIBLE_DEVICES": "1",
           "LORAFLEET_SECRET_KEY": "k", "LORAFLEET_SECURE_COOKIES": "1",
           "XDG_CONFIG_HOME": "/cfg"}
    assert st.dashboard_url("http://127.0.0.1:8765", env) == "http://h:1"
    assert st.dashboard_url("http://127.0.0.1:8765", {}) == "http://127.0.0.1:8765"
    assert (st.api_token(env), st.api_token({})) == ("lf_x", "")
    assert (st.visible_devices(env), st.visible_devices({})) == ("1", None)
    assert (st.session_secret(env), st.session_secret({})) == ("k", "")
    assert st.secure_cookies(env) and not st.secure_cookies({"LORAFLEET_SECURE_COOKIES": "yes"})
    assert st.config_home(env) == Path("/cfg")
    assert st.child_env({"A": "1"}, B="2") == {"A": "1", "B": "2"}


def test_the_scheduler_and_worker_readers():
    assert st.scheduling_env({}) == (24 * 3600.0, 0)
    assert st.scheduling_env({"LORAFLEET_FAIR_WINDOW_S": "0.5",
                              "LORAFLEET_MAX_CARDS_PER_USER": "-3"}) == (1.0, 0)
    assert st.live_caps((4, 100), {}) == (4, 100)
    assert st.live_caps((4, 100), {"LORAFLEET_LIVE_PER_USER": "0",
                                   "LORAFLEET_LIVE_TOTAL": "7"}) == (1, 7)
    with pytest.raises(SystemExit, match="whole numbers"):
        st.live_caps((4, 100), {"LORAFLEET_LIVE_TOTAL": "many"})
    assert st.preload_enabled({}) and not st.preload_enabled({"LORAFLEET_PRELOAD": " Off"})


def test_env_set_puts_back_what_was_there(monkeypatch):
    monkeypatch.delenv("LF_TEST_FLAG", raising=False)
    with st.env_set("LF_TEST_FLAG", "1"):
        assert os.environ["LF_TEST_FLAG"] == "1"
    assert "LF_TEST_FLAG" not in os.environ
    monkeypatch.setenv("LF_TEST_FLAG", "old")
    with st.env_set("LF_TEST_FLAG", "1"):
        pass
    assert os.environ["LF_TEST_FLAG"] == "old"
