"""Keeps nginx's list of nlpserve replicas to those whose gRPC health is SERVING.

Open-source nginx has no active health checks, and it cannot retry a gRPC call once it has sent it to a
replica (the request body is streamed, not kept). So a replica that is shutting down must leave nginx's
rotation *before* it stops: this agent asks every replica's `grpc.health.v1` service (service "", the whole
server) every `--interval` seconds, writes the SERVING ones into the file that nginx.conf includes inside its
`upstream` block, and reloads nginx (SIGHUP to its master process) when the list changes. A draining replica
turns NOT_SERVING the moment it gets SIGTERM, so it stops getting new calls while it finishes its own.

Replicas are found through DNS on every round (`--replicas server:50051`: every A record of the compose
service `server`), so `docker compose up --scale server=N` is followed without a restart.

    python health_agent.py --replicas server:50051 --upstream-file /etc/nginx/upstream/nlpserve.conf \
        --nginx-pid-file /run/nginx/nginx.pid

With TLS on the replicas (docker-compose.tls.yml), `--tls-ca FILE --tls-server-name server`: the replicas are
reached by IP address, so their certificate is checked against the service's name instead.

It needs grpcio and grpcio-health-checking only (the nlpserve image has both).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("health_agent")


def discover(replicas: list[str]) -> list[str]:
    """Every address ("IP:PORT") the HOST:PORT entries resolve to now; a name that does not resolve (no
    replica running yet) contributes none."""
    found = set()
    for entry in replicas:
        host, _, port = entry.rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            log.debug("%s does not resolve: %s", host, exc)
            continue
        found.update(f"{info[4][0]}:{info[4][1]}" for info in infos)
    return sorted(found)


class HealthChecker:
    """One channel per replica, kept between rounds (a replica is checked every `interval` seconds)."""

    def __init__(self, timeout: float, tls_ca: Path | None = None, tls_server_name: str | None = None) -> None:
        self.timeout = timeout
        self._credentials = grpc.ssl_channel_credentials(tls_ca.read_bytes()) if tls_ca else None
        self._options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        self._stubs: dict[str, tuple[grpc.Channel, health_pb2_grpc.HealthStub]] = {}

    def serving(self, address: str) -> bool:
        if address not in self._stubs:
            channel = (
                grpc.secure_channel(address, self._credentials, options=self._options)
                if self._credentials is not None
                else grpc.insecure_channel(address)
            )
            self._stubs[address] = (channel, health_pb2_grpc.HealthStub(channel))
        try:
            reply = self._stubs[address][1].Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError as exc:
            log.debug("%s: %s", address, exc.code())
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def forget(self, keep: list[str]) -> None:
        """Closes the channels of replicas that are gone."""
        for address in set(self._stubs) - set(keep):
            self._stubs.pop(address)[0].close()


def render(addresses: list[str], parameters: str) -> str:
    lines = [f"server {address} {parameters};\n".replace("  ", " ") for address in addresses]
    return "# Written by deploy/nginx/health_agent.py: the replicas that are SERVING.\n" + "".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """nginx must never read half a file: write a temporary file beside it, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def reload_nginx(pid_file: Path | None) -> None:
    if pid_file is None:
        return
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)  # a graceful reload: old workers finish their calls
    except (OSError, ValueError) as exc:
        log.warning("cannot reload nginx through %s: %s", pid_file, exc)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", nargs="+", default=env("AGENT_REPLICAS", "server:50051").split(),
                        help="HOST:PORT of the replicas; a DNS name stands for all its addresses")
    parser.add_argument("--upstream-file", type=Path, default=Path(env("AGENT_UPSTREAM_FILE",
                        "/etc/nginx/upstream/nlpserve.conf")), help="the file nginx.conf includes")
    parser.add_argument("--nginx-pid-file", type=Path, default=env("AGENT_NGINX_PID_FILE"),
                        help="nginx's pid file, to reload it (none: only write the file)")
    parser.add_argument("--server-parameters", default=env("AGENT_SERVER_PARAMETERS",
                        "max_fails=1 fail_timeout=5s"), help="appended to every `server` line")
    parser.add_argument("--interval", type=float, default=float(env("AGENT_INTERVAL", "0.5")),
                        help="seconds between two rounds of health checks")
    parser.add_argument("--timeout", type=float, default=float(env("AGENT_TIMEOUT", "1.0")),
                        help="deadline of one health check")
    parser.add_argument("--tls-ca", type=Path, default=env("AGENT_TLS_CA"),
                        help="TLS to the replicas, trusting this CA certificate (PEM)")
    parser.add_argument("--tls-server-name", default=env("AGENT_TLS_SERVER_NAME"),
                        help="the name the replicas' certificate holds (they are reached by IP address)")
    parser.add_argument("--once", action="store_true", help="one round, then exit")
    parser.add_argument("--log-level", default=env("AGENT_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    checker = HealthChecker(args.timeout, args.tls_ca, args.tls_server_name)
    current = args.upstream_file.read_text() if args.upstream_file.exists() else None
    while True:
        addresses = discover(args.replicas)
        healthy = [address for address in addresses if checker.serving(address)]
        checker.forget(addresses)
        text = render(healthy, args.server_parameters)
        if text != current:
            write_atomically(args.upstream_file, text)
            reload_nginx(args.nginx_pid_file)
            log.info("replicas SERVING: %s (of %s)", ", ".join(healthy) or "none", ", ".join(addresses) or "none")
            current = text
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
