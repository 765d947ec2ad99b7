"""TLS, mTLS and API keys, for every port the server opens (gRPC, HTTP and metrics).

- TLS: `--tls-cert` and `--tls-key` (PEM). The files are checked here with Python's `ssl` module before any
  port opens: gRPC only parses them when it binds the port, and then says nothing better than "Failed to
  bind".
- mTLS: `--tls-client-ca` (PEM): clients must present a certificate signed by one of these CAs, on every
  port alike.
- API keys: `--api-keys-file` (one key a line; blank lines and `#` comments ignored) and/or the environment
  variable NLPSERVE_API_KEYS (comma-separated). Never a flag: a flag's value shows in `ps`. A call must carry
  `authorization: Bearer KEY` metadata, except to the services of `--open-services` (health, by default); the
  metrics port needs no key. A missing or wrong key gets UNAUTHENTICATED with one fixed message, whatever the
  method, known or not, so a caller without a key learns nothing about the server. The HTTP port checks the
  same keys with `ApiKeyInterceptor.authorized` (every path but /health; 401 with the same message).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

import grpc
import grpc.aio

from .config import Settings
from .errors import StartupError

log = logging.getLogger(__name__)

API_KEYS_ENV = "NLPSERVE_API_KEYS"
UNAUTHENTICATED_MESSAGE = "missing or invalid API key"


@dataclasses.dataclass(frozen=True)
class Tls:
    """The server's TLS files, checked, and their contents."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    cert: bytes
    key: bytes
    client_ca: bytes | None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def http_server_args(self) -> dict[str, object]:
        """The TLS arguments of prometheus_client's `start_http_server`."""
        return {
            "certfile": str(self.cert_file),
            "keyfile": str(self.key_file),
            "client_cafile": str(self.client_ca_file) if self.client_ca_file else None,
            "client_auth_required": self.client_ca_file is not None,
        }


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag} {path}: {exc.strerror or exc}") from exc


def _encrypted_key() -> bytes:
    # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on the terminal.
    raise ValueError("the key is encrypted")


def load_tls(settings: Settings) -> Tls | None:
    """The TLS files of `settings` (None when TLS is off). Raises StartupError naming the flag at fault."""
    if settings.tls_cert is None:
        return None
    assert settings.tls_key is not None  # config._check makes sure
    cert = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    client_ca = _read(settings.tls_client_ca, "--tls-client-ca") if settings.tls_client_ca else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=cert.decode("latin-1"))
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(f"--tls-cert {settings.tls_cert}: no PEM certificate in it") from exc
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=_encrypted_key)
    except ValueError as exc:
        raise StartupError(f"--tls-key {settings.tls_key}: {exc}; give an unencrypted PEM key") from exc
    except ssl.SSLError as exc:
        problem = (
            "does not match the certificate of --tls-cert"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else "not a PEM private key"
        )
        raise StartupError(f"--tls-key {settings.tls_key}: {problem}") from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("latin-1"))
        except (ssl.SSLError, ValueError) as exc:
            raise StartupError(f"--tls-client-ca {settings.tls_client_ca}: no PEM certificate in it") from exc
    log.info(
        "TLS on the gRPC, HTTP and metrics ports (%s)",
        "client certificates required" if client_ca is not None else "no client certificates asked",
    )
    return Tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca, cert, key, client_ca)


def _check_key(key: str, where: str) -> bytes:
    # Metadata values are printable ASCII, and a space would end the key early in "Bearer KEY". The key itself
    # is never shown.
    if not all("!" <= c <= "~" for c in key):
        raise StartupError(f"{where}: an API key must be printable ASCII without spaces")
    return key.encode()


def load_api_keys(path: Path | None, environ: Mapping[str, str]) -> tuple[bytes, ...]:
    """The API keys of `--api-keys-file` and NLPSERVE_API_KEYS together (none: keys are off).

    Raises StartupError for an unreadable or empty file, or a variable that is set but holds no key.
    """
    keys: list[bytes] = []
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupError(f"--api-keys-file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(_check_key(line, f"--api-keys-file {path}, line {number}"))
        if not keys:
            # An empty file most likely means a secret that was not filled in: refusing to start beats
            # serving without keys.
            raise StartupError(f"--api-keys-file {path}: no key in it (one key a line)")
    raw = environ.get(API_KEYS_ENV, "")
    if raw.strip():
        from_env = [part.strip() for part in raw.split(",") if part.strip()]
        if not from_env:
            raise StartupError(f"{API_KEYS_ENV}: no key in it (comma-separated keys)")
        keys += [_check_key(key, f"{API_KEYS_ENV}, key {i}") for i, key in enumerate(from_env, 1)]
    return tuple(keys)


def parse_open_services(text: str) -> frozenset[str]:
    """`--open-services`: full service names, comma-separated; "" or "none" opens none."""
    names = {name.strip() for name in text.split(",")} - {""}
    return frozenset() if names == {"none"} else frozenset(names)


async def _refuse(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


# One refusing handler per kind of RPC, so that a stream is refused like a stream. No deserializer: the
# request is never parsed.
_REFUSALS = {
    (False, False): grpc.unary_unary_rpc_method_handler(_refuse),
    (False, True): grpc.unary_stream_rpc_method_handler(_refuse),
    (True, False): grpc.stream_unary_rpc_method_handler(_refuse),
    (True, True): grpc.stream_stream_rpc_method_handler(_refuse),
}


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when it carries `authorization: Bearer KEY` with one of the keys, or when its
    service is open; refuses it with UNAUTHENTICATED otherwise.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key without stopping at a
    match, so that neither the time taken nor anything else tells a caller how close a guess was, which key
    matched, or how long the keys are. `on_refused(method)` is called for a refused call to a method the
    server has (its short name: a bounded metric label).
    """

    def __init__(
        self,
        keys: Iterable[bytes],
        open_services: Iterable[str] = (),
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._digests = tuple(hashlib.sha256(key).digest() for key in keys)
        if not self._digests:
            raise ValueError("no API key")
        self._open = frozenset(open_services)
        self._on_refused = on_refused

    def authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str):
            return False
        scheme, _, presented = value.partition(" ")
        if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110)
            return False
        digest = hashlib.sha256(presented.strip().encode()).digest()
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if service in self._open or self.authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: refused the same way, not UNIMPLEMENTED
            return _REFUSALS[False, False]
        if self._on_refused is not None:
            self._on_refused(method)
        return _REFUSALS[handler.request_streaming, handler.response_streaming]


def api_key_interceptors(
    settings: Settings,
    environ: Mapping[str, str],
    tls_on: bool,
    on_refused: Callable[[str], None] | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors: an `ApiKeyInterceptor` when keys are configured, else none."""
    keys = load_api_keys(settings.api_keys_file, environ)
    if not keys:
        return []
    open_services = parse_open_services(settings.open_services)
    log.info(
        "API keys required (%d keys); open without a key: %s",
        len(keys),
        ", ".join(sorted(open_services)) or "no service",
    )
    if not tls_on:
        log.warning(
            "API keys without TLS: keys travel in clear text (fine only behind a TLS-terminating proxy)"
        )
    return [ApiKeyInterceptor(keys, open_services, on_refused)]
