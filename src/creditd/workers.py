"""`creditd serve --workers N`: N server processes on one port, each a full replica.

One Python process is bound by one core (the event loop, gRPC's Python side). The kernel
spreads incoming connections over the processes listening with SO_REUSEPORT on the same
port; each process is a replica like any other (its own write-behind, sweeper, health
monitor and Redis and Postgres connections), so a call may land on any of them: sessions
belong to the hot store, not to a process. This parent process only starts them, restarts
one that dies, and passes SIGTERM/SIGINT on (each worker drains).

The workers share one admin key (the parent's CREDITD_ADMIN_TOKEN, or one it makes); a
metrics endpoint, if set, is on its port plus the worker's number (0, 1, ...).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from types import FrameType

from creditd.config import Settings, host_port

RESTART_DELAY_SECONDS = 1.0


def worker_env(settings: Settings, number: int, admin_token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CREDITD_REUSE_PORT="1", CREDITD_ADMIN_TOKEN=admin_token)
    if settings.metrics_listen:
        host, port = host_port(settings.metrics_listen, "CREDITD_METRICS_LISTEN")
        env["CREDITD_METRICS_LISTEN"] = f"{host}:{port + number}" if port else f"{host}:0"
    return env


def run(settings: Settings, argv: list[str]) -> int:
    """Run `settings.workers` workers of the command line `argv` (which makes each one a
    single process) until a signal; returns the exit code."""
    admin_token = settings.admin_token or f"cdk_bootstrap_{secrets.token_urlsafe(24).replace('_', '-')}"
    command = [sys.executable, "-m", "creditd.cli", *argv]
    workers: dict[int, subprocess.Popen[bytes]] = {}
    stopping: list[int] = []

    def start(number: int) -> None:
        workers[number] = subprocess.Popen(command, env=worker_env(settings, number, admin_token))

    def stop(signum: int, _: FrameType | None) -> None:
        stopping.append(signum)
        for process in workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for number in range(settings.workers):
        start(number)
    print(f"creditd: {settings.workers} workers on {settings.listen}", flush=True)
    if not settings.admin_token:
        print(f"admin key of the workers (set CREDITD_ADMIN_TOKEN to choose one): {admin_token}", flush=True)
    while True:
        for number, process in list(workers.items()):
            code = process.poll()
            if code is None:
                continue
            if stopping:
                del workers[number]
            else:  # died on its own: a replica less until it is back
                print(f"creditd: worker {number} exited with {code}; starting it again", file=sys.stderr, flush=True)
                time.sleep(RESTART_DELAY_SECONDS)
                start(number)
        if stopping and not workers:
            return 0
        time.sleep(0.2)
