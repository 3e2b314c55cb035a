"""Ask a running creditd whether it is healthy, using the standard gRPC health service.

    python -m creditd.healthcheck [address] [service]

``address`` defaults to where ``CREDITD_LISTEN`` says creditd listens (a wildcard host such as
0.0.0.0 is reached on 127.0.0.1), else 127.0.0.1:50051; ``service`` defaults to "" (the server as a whole);
readiness is ``creditd.v1.MeteringService``. Exits 0 when the answer is SERVING and 1
otherwise (not serving, unknown service, nothing listening, or no answer within 3 s).
Used by the container image's HEALTHCHECK.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
TIMEOUT_SECONDS = 3.0
_WILDCARD_HOSTS = {"", "0.0.0.0", "[::]", "::"}


def default_address() -> str:
    """The address to check: ``CREDITD_LISTEN`` with a wildcard host replaced by loopback."""
    listen = os.environ.get("CREDITD_LISTEN", "").strip()
    if not listen:
        return DEFAULT_ADDRESS
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in _WILDCARD_HOSTS else listen


def check(address: str = DEFAULT_ADDRESS, service: str = "", timeout: float = TIMEOUT_SECONDS) -> bool:
    """True when the health service at ``address`` reports ``service`` as SERVING."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 2 or any(a in ("-h", "--help") for a in args):
        print("usage: python -m creditd.healthcheck [address] [service]", file=sys.stderr)
        return 1  # Docker reserves exit code 2 for HEALTHCHECK
    address = args[0] if args else default_address()
    service = args[1] if len(args) > 1 else ""
    healthy = check(address, service)
    label = service or "(server)"
    print(f"{address} {label}: {'SERVING' if healthy else 'NOT SERVING'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
