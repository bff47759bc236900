"""The suite does not depend on the caller's environment (tests/conftest.py: ``hermetic_environment``,
``local_hub_env``): a cluster's ``HF_HUB_OFFLINE=1`` or a leaked ``WORLD_SIZE`` changes no test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import caller_variables, local_hub_env

CLUSTER_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "https://mirror.invalid",
                       "HF_TOKEN": "hf_callers_own", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                       "ACCELERATE_MIXED_PRECISION": "bf16"}

CLIENT = """
import json, os
from huggingface_hub import constants, is_offline_mode
from huggingface_hub.utils import get_session
status = get_session().get(constants.ENDPOINT + "/ping").status_code
print(json.dumps({"offline": is_offline_mode(), "endpoint": constants.ENDPOINT, "status": status,
                  "token": os.environ.get("HF_TOKEN"), "world_size": os.environ.get("WORLD_SIZE"),
                  "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


class Ping(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def run_client(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def local_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_caller_variables_names_hub_and_launcher_settings_only():
    environ = {**CLUSTER_ENVIRONMENT, "PATH": "/bin", "HF_SPEC_MODELS_DIR": "/models", "OMP_NUM_THREADS": "2"}
    assert sorted(caller_variables(environ)) == sorted(CLUSTER_ENVIRONMENT)


def test_tests_see_none_of_the_callers_hub_or_launcher_variables():
    """Meaningful when the caller exported some (``HF_HUB_OFFLINE=1 pytest ...``); see the subprocess test below."""
    assert caller_variables() == []
    assert os.environ["HF_HOME"] != os.path.expanduser("~/.cache/huggingface")


def test_in_process_hub_access_fails_at_once():
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    with pytest.raises((LocalEntryNotFoundError, OfflineModeIsEnabled)):
        hf_hub_download("hf-spec-tests/never-downloaded", "config.json")


def test_a_local_hub_client_is_online_whatever_the_caller_exported(monkeypatch, local_server, tmp_path):
    for name, value in CLUSTER_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)  # as if a cluster job exported them
    inherited = run_client({**os.environ, "HF_ENDPOINT": local_server})
    assert inherited.returncode != 0 and "OfflineModeIsEnabled" in inherited.stderr  # what the local Hub tests hit

    result = run_client(local_hub_env(local_server, tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"offline": False, "endpoint": local_server, "status": 200, "token": "hf_local",
                    "world_size": None, "cuda_visible": ""}
