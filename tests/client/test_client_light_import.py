"""The client needs only grpcio and protobuf: proved in a fresh interpreter where nothing else can be imported."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh, isolated interpreter (-I: no PYTHONPATH, no user site, no current directory on sys.path).
# A meta-path finder refuses every top-level module outside the standard library, grpcio (grpc and its
# typing_extensions dependency), protobuf (google) and the client itself: as if nothing else were installed.
# grpc imports grpc_tools, grpc_health and grpc_reflection when present; here they are "absent", as they
# would be on a client-only machine.
PROGRAM = textwrap.dedent(
    """
    import importlib.abc, json, sys

    preloaded = set(sys.modules)  # by site, before this program runs (the editable install's .pth hooks)

    ALLOWED = {"grpc", "google", "typing_extensions", "client"}

    class OnlyGrpcAndProtobuf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or top in ALLOWED or top.startswith(("_cython", "cython_")):
                return None  # let the normal finders look
            raise ModuleNotFoundError(f"blocked: {name}", name=name)

    finder = OnlyGrpcAndProtobuf()
    sys.meta_path.insert(0, finder)
    try:  # installed in the test environment: the finder must hide it
        import numpy
        numpy_hidden = False
    except ModuleNotFoundError:
        numpy_hidden = True
    sys.path.insert(0, sys.argv[1])  # the checkout, for `client`

    import asyncio, io
    import client
    from client import AsyncClient, Client, ServerError
    from client.cli import main

    target, commands = sys.argv[2], json.loads(sys.argv[3])
    report = {}
    with Client(target, timeout=30) as c:
        try:
            report["sync"] = c.health()
        except ServerError as e:
            report["sync"] = e.code.name

    async def use_async():
        async with AsyncClient(target, timeout=30) as c:
            try:
                report["async"] = sorted(m.name for m in await c.list_models())
            except ServerError as e:
                report["async"] = e.code.name

    asyncio.run(use_async())
    report["cli"] = []
    for argv in commands:
        out, err = io.StringIO(), io.StringIO()
        code = main(["--target", target, *argv], stdout=out, stderr=err)
        report["cli"].append([code, out.getvalue(), err.getvalue()])

    heavy = sorted({m.partition(".")[0] for m in sys.modules} & {
        "numpy", "onnxruntime", "tokenizers", "torch", "transformers", "prometheus_client",
        "grpc_health", "grpc_reflection", "grpc_tools", "server", "export",
    })
    loaded = {m.partition(".")[0] for m in set(sys.modules) - preloaded}
    outside = sorted(m for m in loaded - set(sys.stdlib_module_names) - ALLOWED
                     if not m.startswith(("_cython", "cython_")))
    report.update(heavy=heavy, outside=outside, numpy_hidden=numpy_hidden)
    print(json.dumps(report))
    """
)


def run_isolated(target: str, commands: list[list[str]]) -> dict:
    """Runs PROGRAM against `target` (the CLI once per command); returns its report."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", PROGRAM, str(ROOT), target, json.dumps(commands)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["numpy_hidden"]  # the finder did hide what is installed here
    assert report["heavy"] == [] and report["outside"] == []
    return report


def test_the_client_imports_and_works_with_only_grpcio_and_protobuf():
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        report = run_isolated(f"127.0.0.1:{s.getsockname()[1]}", [["generate", "Once"], ["--help"]])
    assert report["sync"] == report["async"] == "UNAVAILABLE"
    (code, out, err), (help_code, help_out, _) = report["cli"]
    assert code == 1 and out == "" and err.startswith("error: UNAVAILABLE: ")
    assert help_code == 0 and "usage:" in help_out


def test_the_light_client_talks_to_the_real_server(target):
    report = run_isolated(
        target,
        [["classify", "a fine film"], ["generate", "Return the", "--max-new-tokens", "4"], ["health"]],
    )
    assert report["sync"] == "SERVING" and report["async"] == ["docgpt", "minilm-embed", "sentiment"]
    (classify_code, classify_out, _), (gen_code, gen_out, _), (health_code, health_out, _) = report["cli"]
    assert classify_code == 0 and classify_out.rstrip().endswith("a fine film")
    assert gen_code == 0 and gen_out.endswith("\n")
    assert (health_code, health_out) == (0, "SERVING\n")
