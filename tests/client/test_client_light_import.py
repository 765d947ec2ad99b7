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

    import asyncio
    import client
    from client import AsyncClient, Client, ServerError
    from client.cli import main

    target = sys.argv[2]
    codes = {}
    with Client(target, timeout=10) as c:
        try:
            c.health()
        except ServerError as e:
            codes["sync"] = e.code.name

    async def use_async():
        async with AsyncClient(target, timeout=10) as c:
            try:
                await c.list_models()
            except ServerError as e:
                codes["async"] = e.code.name

    asyncio.run(use_async())
    codes["cli"] = main(["--target", target, "generate", "Once"])
    codes["help"] = main(["--help"])

    heavy = sorted({m.partition(".")[0] for m in sys.modules} & {
        "numpy", "onnxruntime", "tokenizers", "torch", "transformers", "prometheus_client",
        "grpc_health", "grpc_reflection", "grpc_tools", "server", "export",
    })
    loaded = {m.partition(".")[0] for m in set(sys.modules) - preloaded}
    outside = sorted(m for m in loaded - set(sys.stdlib_module_names) - ALLOWED
                     if not m.startswith(("_cython", "cython_")))
    print(json.dumps({"codes": codes, "heavy": heavy, "outside": outside, "numpy_hidden": numpy_hidden}))
    """
)


def test_the_client_imports_and_works_with_only_grpcio_and_protobuf():
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-I", "-c", PROGRAM, str(ROOT), target],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["codes"] == {"sync": "UNAVAILABLE", "async": "UNAVAILABLE", "cli": 1, "help": 0}
    assert report["heavy"] == [] and report["outside"] == []
    assert report["numpy_hidden"]  # the finder did hide what is installed here
