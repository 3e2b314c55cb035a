"""The servers the benchmarks start, each in a process of its own.

    python bench/servers.py bare --listen 127.0.0.1:PORT [--uvloop] [--reuseport]
        a grpc.aio MeteringService whose Authorize does no work (an empty AuthorizeResponse)
    python bench/servers.py creditd [--uvloop] [--reuseport]
        `creditd serve` itself, configured by CREDITD_* variables

--uvloop runs the event loop on uvloop. --reuseport binds with SO_REUSEPORT so that several
processes share one port (the kernel spreads connections over them): creditd.app sets
"grpc.so_reuseport" to 0 in server_options, which this wrapper changes to 1 (bench only).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


def _log_gc_pauses(threshold: float = 0.05) -> None:
    """Print every garbage collection that holds the process longer than `threshold` s."""
    import gc
    import sys
    import time

    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            took = time.perf_counter() - started.pop("t")
            if took >= threshold:
                text = f"gc pause: generation {info['generation']} took {took * 1000:.0f} ms"
                print(text, file=sys.stderr, flush=True)

    gc.callbacks.append(callback)


def _use_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class _Bare:
    async def Authorize(self, request: Any, context: Any) -> Any:
        from creditd_client.v1 import metering_pb2

        return metering_pb2.AuthorizeResponse()


async def _serve_bare(listen: str, reuseport: bool) -> None:
    import grpc
    from creditd_client.v1 import metering_pb2_grpc

    servicer = type("BareMetering", (_Bare, metering_pb2_grpc.MeteringServiceServicer), {})()
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuseport))])
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    if not port:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    print(f"bare servicer listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    await server.wait_for_termination()


def _serve_creditd(reuseport: bool) -> None:
    if reuseport:
        import creditd.app as app_module

        original = app_module.server_options

        def options(settings: Any) -> list[tuple[str, int]]:
            return [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in original(settings)]

        app_module.server_options = options
    from creditd.cli import main

    main(["serve"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("bare", "creditd"))
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--reuseport", action="store_true")
    parser.add_argument("--gc-log", action="store_true", help="print garbage collections longer than 50 ms")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() the start-up heap; collect gen 2 rarely")
    args = parser.parse_args()
    if args.gc_log:
        _log_gc_pauses()
    if args.gc_freeze:
        import gc

        gc.freeze()
        gc.set_threshold(10_000, 50, 1_000)
    if args.uvloop:
        _use_uvloop()
    if args.kind == "bare":
        asyncio.run(_serve_bare(args.listen, args.reuseport))
    else:
        _serve_creditd(args.reuseport)


if __name__ == "__main__":
    main()
