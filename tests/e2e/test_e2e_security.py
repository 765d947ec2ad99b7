"""TLS, mTLS and API keys on the real server: certificates made here (the `cryptography` package, for 127.0.0.1
and localhost), real handshakes over loopback, the real client library and CLI.

Three servers, each on a one-model repository (the quick classifier) so that they start in about a second:
TLS with API keys (from a file and from NLPSERVE_API_KEYS); mTLS with API keys and no open service; and a server
whose certificate has expired. Start-up failures run the server as a command and read its one line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import AsyncClient, Client, ServerError, cli
from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc
from server.config import load_settings
from server.errors import StartupError
from server.process import ROOT, ServerProcess
from server.security import (
    UNAUTHENTICATED_MESSAGE,
    ApiKeyInterceptor,
    load_api_keys,
    load_tls,
    parse_open_services,
)

FILE_KEY, ENV_KEY = "file-key-0123456789", "env-key-0123456789"
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


# ---------------------------------------------------------------------------------------------------------
# Certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Authority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, client: bool, expired: bool = False) -> tuple[bytes, bytes]:
        """A certificate (PEM) and its key (PEM): a server's for localhost and 127.0.0.1, or a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (NOW - 10 * DAY, NOW - DAY) if expired else (NOW - DAY, NOW + 30 * DAY)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if not client:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _pem_key(key)


class Pki:
    """Every file the tests use, in one folder: `pki.path("server")`, `pki.path("server-key")`..."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        ca, other = Authority("nlpserve test CA"), Authority("some other CA")
        self.write("ca", ca.pem)
        self.write("other-ca", other.pem)
        for name, (cert, key) in {
            "server": ca.issue("nlpserve", client=False),
            "expired-server": ca.issue("nlpserve", client=False, expired=True),
            "client": ca.issue("a client", client=True),
            "expired-client": ca.issue("a client", client=True, expired=True),
            "other-client": other.issue("a client", client=True),
        }.items():
            self.write(name, cert)
            self.write(f"{name}-key", key)
        self.write("keys", f"# the API keys, one a line\n\n{FILE_KEY}\n".encode(), suffix=".txt")

    def write(self, name: str, data: bytes, suffix: str = ".pem") -> Path:
        path = self.folder / f"{name}{suffix}"
        path.write_bytes(data)
        return path

    def path(self, name: str) -> str:
        return str(self.folder / f"{name}.txt" if name == "keys" else self.folder / f"{name}.pem")

    def read(self, name: str) -> bytes:
        return Path(self.path(name)).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(quick_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick classifier alone: a server on it is SERVING in about a second."""
    folder = tmp_path_factory.mktemp("one-model")
    (folder / "sentiment").symlink_to(quick_repo / "sentiment", target_is_directory=True)
    return folder


def tls_args(pki: Pki, server: str = "server") -> list[str]:
    return ["--tls-cert", pki.path(server), "--tls-key", pki.path(f"{server}-key")]


@pytest.fixture(scope="module")
def tls_srv(repo: Path, pki: Pki) -> Iterator[ServerProcess]:
    """TLS, API keys from a file and from NLPSERVE_API_KEYS, health open (the default)."""
    args = [*tls_args(pki), "--api-keys-file", pki.path("keys")]
    with ServerProcess(repo, args=args, env={"NLPSERVE_API_KEYS": f" {ENV_KEY} , another-key-42,"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_srv(repo: Path, pki: Pki) -> Iterator[ServerProcess]:
    """mTLS (client certificates of the test CA) and API keys, every service behind the key."""
    args = [*tls_args(pki), "--tls-client-ca", pki.path("ca"), "--open-services", "none"]
    with ServerProcess(repo, args=args, env={"NLPSERVE_API_KEYS": ENV_KEY}) as srv:
        yield srv


def secure(srv: ServerProcess, pki: Pki, ca: str = "ca", client: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read(ca),
        private_key=pki.read(f"{client}-key") if client else None,
        certificate_chain=pki.read(client) if client else None,
    )
    return grpc.secure_channel(srv.target, credentials)


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def health(channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10, metadata=metadata
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def classify(channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> str:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    return (
        stub.Classify(pb.ClassifyRequest(texts=["a fine film"]), timeout=10, metadata=metadata)
        .results[0]
        .label
    )


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


def scrape(srv: ServerProcess, context: ssl.SSLContext) -> dict[tuple[str, tuple], float]:
    url = f"https://127.0.0.1:{srv.metrics_port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---------------------------------------------------------------------------------------------------------
# TLS


def test_tls_with_the_right_ca(tls_srv, pki):
    with secure(tls_srv, pki) as channel:
        assert health(channel) == "SERVING"
        assert classify(channel, bearer(FILE_KEY)) in {"positive", "negative"}


def test_the_certificate_holds_localhost_too(tls_srv, pki):
    # Connecting to 127.0.0.1 but checking the certificate against the name "localhost".
    with Client(tls_srv.target, timeout=10, tls_ca=pki.path("ca"), tls_server_name="localhost") as c:
        assert c.health() == "SERVING"


def test_a_plaintext_client_fails(tls_srv):
    with grpc.insecure_channel(tls_srv.target) as channel:
        assert refused(lambda: health(channel)).code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_fails(tls_srv, pki):
    with secure(tls_srv, pki, ca="other-ca") as channel:
        error = refused(lambda: health(channel))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in error.details()


def test_an_expired_server_certificate_fails(repo, pki):
    with ServerProcess(repo, args=tls_args(pki, "expired-server")) as srv, secure(srv, pki) as channel:
        error = refused(lambda: health(channel))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "certificate has expired" in error.details()


def test_metrics_over_tls_without_a_key(tls_srv, pki):
    with secure(tls_srv, pki) as channel:
        refused(lambda: classify(channel))  # counted, as model "" and its method
    samples = scrape(tls_srv, ssl.create_default_context(cafile=pki.path("ca")))
    labels = (("code", "UNAUTHENTICATED"), ("method", "Classify"), ("model", ""))
    assert samples[("nlpserve_requests_total", labels)] >= 1
    # Plain HTTP on the TLS port is refused.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_srv.metrics_port}/metrics", timeout=10).read()


# ---------------------------------------------------------------------------------------------------------
# API keys


@pytest.mark.parametrize("key", [FILE_KEY, ENV_KEY, "another-key-42"], ids=["file", "env", "env-second"])
def test_every_configured_key_works(tls_srv, pki, key):
    with secure(tls_srv, pki) as channel:
        assert classify(channel, bearer(key)) in {"positive", "negative"}
        assert classify(channel, [("authorization", f"bearer {key}")])  # the scheme is case-insensitive


@pytest.mark.parametrize(
    "metadata",
    [None, bearer("wrong"), bearer(FILE_KEY + "x"), bearer(FILE_KEY[:-1]), [("authorization", FILE_KEY)]],
    ids=["missing", "wrong", "longer", "shorter", "no-scheme"],
)
def test_a_missing_or_wrong_key_is_unauthenticated_and_reveals_nothing(tls_srv, pki, metadata):
    with secure(tls_srv, pki) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        calls = {
            "unary": lambda: stub.Classify(pb.ClassifyRequest(texts=["x"]), timeout=10, metadata=metadata),
            "stream": lambda: list(
                stub.GenerateStream(pb.GenerateRequest(prompt="x"), timeout=10, metadata=metadata)
            ),
            "unknown method": lambda: channel.unary_unary("/nlpserve.v1.InferenceService/Nope")(
                b"", timeout=10, metadata=metadata
            ),
            "reflection": lambda: list(
                reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    timeout=10,
                    metadata=metadata,
                )
            ),
        }
        for what, call in calls.items():
            error = refused(call)
            assert (error.code(), error.details()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                UNAUTHENTICATED_MESSAGE,
            ), what
            assert not error.trailing_metadata(), what


def test_with_the_key_an_unknown_method_is_unimplemented(tls_srv, pki):
    with secure(tls_srv, pki) as channel:
        call = channel.unary_unary("/nlpserve.v1.InferenceService/Nope")
        error = refused(lambda: call(b"", timeout=10, metadata=bearer(FILE_KEY)))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_client_library_sends_the_key(tls_srv, pki, monkeypatch):
    with Client(tls_srv.target, timeout=10, tls_ca=pki.path("ca"), api_key=FILE_KEY) as c:
        assert c.classify("a fine film")[0].label
        assert [m.name for m in c.list_models()] == ["sentiment"]
    monkeypatch.setenv("NLPSERVE_API_KEY", ENV_KEY)
    with Client(tls_srv.target, timeout=10, tls_ca=pki.read("ca")) as c:  # the CA as bytes, the key from env
        assert c.classify("a fine film")[0].label
    with Client(tls_srv.target, timeout=10, tls_ca=pki.path("ca"), api_key="") as c:  # "": no key at all
        with pytest.raises(ServerError) as exc:
            c.classify("a fine film")
        assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"


def test_the_async_client_sends_the_key(tls_srv, pki):
    async def main() -> tuple[str, str]:
        async with AsyncClient(tls_srv.target, timeout=10, tls_ca=pki.read("ca"), api_key=ENV_KEY) as c:
            chunks = []
            with pytest.raises(ServerError) as exc:  # the key passes; the server has no generator
                async for chunk in c.generate_stream("x"):
                    chunks.append(chunk)
            return (await c.classify(["a fine film"]))[0].label, exc.value.code.name

    label, code = asyncio.run(main())
    assert label and code in {"NOT_FOUND", "INVALID_ARGUMENT"}


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


def test_cli_with_api_key_flag_and_environment(tls_srv, pki, monkeypatch):
    monkeypatch.delenv("NLPSERVE_API_KEY", raising=False)
    common = ["--target", tls_srv.target, "--tls-ca", pki.path("ca")]
    code, out, _ = run_cli(*common, "--api-key", FILE_KEY, "classify", "a fine film")
    assert code == 0 and "a fine film" in out
    code, _, err = run_cli(*common, "models")
    assert (code, err) == (1, f"error: UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}\n")
    assert run_cli(*common, "health")[:2] == (0, "SERVING\n")  # health is open
    monkeypatch.setenv("NLPSERVE_API_KEY", ENV_KEY)
    monkeypatch.setenv("NLPSERVE_TLS_CA", pki.path("ca"))
    code, out, _ = run_cli("--target", tls_srv.target, "models")
    assert code == 0 and "sentiment" in out


def test_cli_handshake_failure_is_one_line(tls_srv, pki):
    """As a command, so that everything on stderr is seen, gRPC's own logging included."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    argv = ["--target", tls_srv.target, "--tls-ca", pki.path("other-ca"), "health"]
    result = subprocess.run(
        [sys.executable, "-m", "client", *argv],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(
        f"error: UNAVAILABLE: TLS handshake with the server at {tls_srv.target} failed"
    )
    assert result.stderr.count("\n") == 1, result.stderr


# ---------------------------------------------------------------------------------------------------------
# mTLS


@pytest.mark.parametrize(
    "client", [None, "other-client", "expired-client"], ids=["none", "other-ca", "expired"]
)
def test_mtls_refuses_a_client_without_a_good_certificate(mtls_srv, pki, client):
    with secure(mtls_srv, pki, client=client) as channel:
        assert refused(lambda: health(channel, bearer(ENV_KEY))).code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_a_good_client_certificate(mtls_srv, pki):
    with secure(mtls_srv, pki, client="client") as channel:
        assert health(channel, bearer(ENV_KEY)) == "SERVING"
        assert classify(channel, bearer(ENV_KEY)) in {"positive", "negative"}
        # --open-services none: health needs the key too.
        error = refused(lambda: health(channel))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    cert = {"tls_cert": pki.path("client"), "tls_key": pki.path("client-key")}
    with Client(mtls_srv.target, timeout=10, tls_ca=pki.path("ca"), api_key=ENV_KEY, **cert) as c:
        assert c.classify("a fine film")[0].label


def test_mtls_on_the_metrics_port(mtls_srv, pki):
    context = ssl.create_default_context(cafile=pki.path("ca"))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        scrape(mtls_srv, context)
    context.load_cert_chain(pki.path("client"), pki.path("client-key"))
    assert any(name == "nlpserve_model_info" for name, _ in scrape(mtls_srv, context))


# ---------------------------------------------------------------------------------------------------------
# Bad settings: one line, before any port opens


def settings(repo: Path, *argv: str):
    return load_settings(["--models", str(repo), *argv], {})


def test_a_bad_certificate_file_stops_the_start_with_one_line(repo, pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    result = subprocess.run(
        [sys.executable, "-m", "server", "--models", str(repo), "--port", "0", "--metrics-port", "0",
         "--tls-cert", str(garbage), "--tls-key", pki.path("server-key")],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = (result.stdout + result.stderr).strip().splitlines()
    assert line.endswith(f"cannot start: --tls-cert {garbage}: no PEM certificate in it")


def test_bad_tls_files_name_the_flag(repo, pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(pki.read("server-key"), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    server, server_key = pki.path("server"), pki.path("server-key")
    cases = {
        "--tls-cert /nope.pem: No such file or directory": ["--tls-cert", "/nope.pem", "--tls-key", server_key],
        f"--tls-cert {garbage}: no PEM certificate in it": ["--tls-cert", str(garbage), "--tls-key", server_key],
        f"--tls-key {garbage}: not a PEM private key": ["--tls-cert", server, "--tls-key", str(garbage)],
        f"--tls-key {server}: not a PEM private key": ["--tls-cert", server, "--tls-key", server],
        f"--tls-key {pki.path('client-key')}: does not match the certificate of --tls-cert": [
            "--tls-cert", server, "--tls-key", pki.path("client-key"),
        ],
        f"--tls-key {encrypted}: the key is encrypted; give an unencrypted PEM key": [
            "--tls-cert", server, "--tls-key", str(encrypted),
        ],
        f"--tls-client-ca {garbage}: no PEM certificate in it": [
            *tls_args(pki), "--tls-client-ca", str(garbage),
        ],
    }  # fmt: skip
    for message, argv in cases.items():
        with pytest.raises(StartupError) as exc:
            load_tls(settings(repo, *argv))
        assert str(exc.value) == message
    assert load_tls(settings(repo)) is None
    tls = load_tls(settings(repo, *tls_args(pki), "--tls-client-ca", pki.path("ca")))
    assert tls is not None and tls.http_server_args()["client_auth_required"] is True


def test_api_keys_from_file_and_environment(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# a comment\n\n  key-one  \n#key-not\nkey-two\n")
    assert load_api_keys(keys, {}) == (b"key-one", b"key-two")
    assert load_api_keys(keys, {"NLPSERVE_API_KEYS": "a,,b "}) == (b"key-one", b"key-two", b"a", b"b")
    assert load_api_keys(None, {"NLPSERVE_API_KEYS": ""}) == ()  # empty: unset
    assert load_api_keys(None, {}) == ()
    problems = {
        "--api-keys-file {}: no key in it (one key a line)": ("# only a comment\n\n", {}),
        "--api-keys-file {}, line 2: an API key must be printable ASCII without spaces": (
            "ok\nwith space\n",
            {},
        ),
        "NLPSERVE_API_KEYS: no key in it (comma-separated keys)": (None, {"NLPSERVE_API_KEYS": " , "}),
        "NLPSERVE_API_KEYS, key 2: an API key must be printable ASCII without spaces": (
            None,
            {"NLPSERVE_API_KEYS": "ok,caf\u00e9"},
        ),
    }
    for message, (text, environ) in problems.items():
        if text is not None:
            keys.write_text(text)
        with pytest.raises(StartupError) as exc:
            load_api_keys(keys if text is not None else None, environ)
        assert str(exc.value) == message.format(keys)
    with pytest.raises(StartupError, match="No such file"):
        load_api_keys(tmp_path / "missing", {})


def test_the_interceptor_compares_every_key():
    interceptor = ApiKeyInterceptor([b"alpha-key", b"beta-key"])
    assert interceptor.authorized([("authorization", "Bearer beta-key")])
    assert interceptor.authorized([("x-other", "1"), ("authorization", "BEARER alpha-key")])
    for metadata in (None, [], [("authorization", "Bearer")], [("authorization", "Basic alpha-key")],
                     [("authorization", "Bearer alpha-ke")], [("authorization", b"Bearer alpha-key")]):  # fmt: skip
        assert not interceptor.authorized(metadata), metadata
    assert parse_open_services("grpc.health.v1.Health, x.Y") == {"grpc.health.v1.Health", "x.Y"}
    assert parse_open_services("none") == parse_open_services("") == frozenset()
