"""The client's TLS and API-key arguments without a server: what is checked before any connection, and the
CLI's one-line errors for files it cannot use. (Real handshakes and keys: tests/e2e/test_e2e_security.py.)"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest

from client import AsyncClient, Client, cli
from client.sync import auth_metadata

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def garbage(tmp_path: Path) -> str:
    path = tmp_path / "garbage.pem"
    path.write_text("not PEM at all\n")
    return str(path)


def test_cli_files_it_cannot_use_are_one_line_and_exit_2(garbage, tmp_path, monkeypatch):
    monkeypatch.delenv("NLPSERVE_TLS_CA", raising=False)
    missing = str(tmp_path / "missing.pem")
    bad_key = "--api-key (or $NLPSERVE_API_KEY): must be printable ASCII without spaces"
    cases = {
        ("--tls-ca", missing): f"--tls-ca {missing}: No such file or directory",
        ("--tls-ca", garbage): f"--tls-ca {garbage}: no PEM data in it",
        ("--tls-ca", str(tmp_path)): f"--tls-ca {tmp_path}: Is a directory",
        ("--tls-cert", garbage): "--tls-cert and --tls-key go together",
        ("--tls-key", garbage): "--tls-cert and --tls-key go together",
        ("--tls-cert", garbage, "--tls-key", garbage): f"--tls-cert {garbage}: no PEM data in it",
        ("--api-key", "two words"): bad_key,
    }
    for argv, message in cases.items():
        assert run(*argv, "health") == (2, "", f"error: {message}\n"), argv
    monkeypatch.setenv("NLPSERVE_TLS_CA", missing)
    assert run("health") == (2, "", f"error: $NLPSERVE_TLS_CA {missing}: No such file or directory\n")
    monkeypatch.delenv("NLPSERVE_TLS_CA")
    monkeypatch.setenv("NLPSERVE_API_KEY", "caf\u00e9")
    assert run("health")[0] == 2


def test_connection_flags_go_before_or_after_the_command():
    args = cli.build_parser("nlpserve").parse_args(
        ["--tls-ca", "ca.pem", "models", "--api-key", "k", "--tls-cert", "c.pem", "--tls-key", "k.pem"]
    )
    assert (args.tls_ca, args.tls_cert, args.tls_key, args.api_key) == ("ca.pem", "c.pem", "k.pem", "k")


def test_library_checks_its_tls_arguments(garbage, tmp_path):
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Client(tls_cert=PEM)
    with pytest.raises(ValueError, match=f"tls_ca: no PEM data in {garbage}"):
        Client(tls_ca=garbage)
    with pytest.raises(ValueError, match="tls_ca: no PEM data in the bytes given"):
        AsyncClient(tls_ca=b"nope")
    with pytest.raises(FileNotFoundError):
        Client(tls_ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="api_key"):
        Client(api_key="has space")
    # Nothing is sent before the first call: these only build secure channels.
    Client("127.0.0.1:1", tls=True).close()
    Client("127.0.0.1:1", tls_ca=PEM, tls_server_name="nlpserve").close()


def test_api_key_metadata(monkeypatch):
    monkeypatch.delenv("NLPSERVE_API_KEY", raising=False)
    assert auth_metadata(None) == ()
    assert auth_metadata("k-1") == (("authorization", "Bearer k-1"),)
    monkeypatch.setenv("NLPSERVE_API_KEY", "from-env")
    assert auth_metadata(None) == (("authorization", "Bearer from-env"),)
    assert auth_metadata("") == ()  # an explicit "" sends no key, whatever the environment


def test_a_plaintext_server_seen_through_tls_is_a_handshake_error():
    """A gRPC server without TLS (the plain grpcio one): the CLI says the TLS handshake failed, in one line."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code, out, err = run("--target", f"127.0.0.1:{port}", "--tls", "--timeout", "10", "health")
    finally:
        server.stop(0)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: UNAVAILABLE: TLS handshake with the server at 127.0.0.1:{port} failed (")
    assert err.count("\n") == 1
