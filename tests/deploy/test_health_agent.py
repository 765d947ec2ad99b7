"""deploy/nginx/health_agent.py on its own: which replicas it lists, against a real server and a dead address."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from server.process import ServerProcess

from .conftest import DEPLOY, free_port

AGENT = DEPLOY / "nginx" / "health_agent.py"


def load_agent():
    spec = importlib.util.spec_from_file_location("health_agent", AGENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_discover_resolves_names_and_skips_unknown_ones():
    agent = load_agent()
    assert agent.discover(["localhost:50051"]) == ["127.0.0.1:50051"]
    assert agent.discover(["no-such-replica.invalid:50051"]) == []


def test_lists_only_serving_replicas(quick_repo, tmp_path: Path):
    upstream = tmp_path / "upstream" / "nlpserve.conf"
    dead = f"127.0.0.1:{free_port()}"
    with ServerProcess(quick_repo) as live:
        argv = [
            sys.executable,
            str(AGENT),
            "--once",
            "--timeout",  # a slow answer on a loaded machine is not a dead replica (the dead one is refused)
            "30",
            "--upstream-file",
            str(upstream),
            "--replicas",
            live.target,
            dead,
        ]
        subprocess.run(argv, check=True, timeout=60)
        servers = [line for line in upstream.read_text().splitlines() if line.startswith("server ")]
        assert servers == [f"server {live.target} max_fails=1 fail_timeout=5s;"]
    # The replica is gone: the next round lists nothing, and nginx answers 502 through its placeholder.
    subprocess.run(argv, check=True, timeout=60)
    assert not [line for line in upstream.read_text().splitlines() if line.startswith("server ")]
