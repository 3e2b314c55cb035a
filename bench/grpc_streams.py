"""What open bidirectional streams cost the barest grpc.aio server: memory and objects.

    python bench/grpc_streams.py                  # 10,000 streams
    python bench/grpc_streams.py --streams 2000

A server with one stream-stream method (raw bytes, no protobuf, no interceptor, a handler
that only reads) takes --streams calls from a client in another process (200 streams per
connection), each of which sends one message and then stays open, as a live call does
between its usage reports. Printed: the server's RSS before and with every stream open,
per stream, and the objects the garbage collector tracks per stream, with the largest kinds
(sys.getsizeof, so what the objects point to outside Python's heap is not in it).

This is the floor under any grpc.aio service holding that many calls on this machine,
whatever it does with them: compare it with `bench/sessions.py --server bare` and creditd.

Opening thousands of streams within a second or two, a few of them fail their first write
(INTERNAL "Internal error from Core" at the client: the server closed them at once). The
client opens another in their place and reports how many.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import subprocess
import sys
import time
from typing import Any

import grpc

METHOD = "/bench.Streams/Open"
STREAMS_PER_CHANNEL = 200


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _read_all(requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
    while await context.read() is not grpc.aio.EOF:
        pass


async def serve(streams: int) -> dict[str, Any]:
    handler = grpc.method_handlers_generic_handler(
        "bench.Streams", {"Open": grpc.stream_stream_rpc_method_handler(_read_all)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gc.collect()
    idle_mb = rss_mb()
    idle_objects = gc.get_objects()
    idle_count, idle_bytes = len(idle_objects), sum(sys.getsizeof(obj) for obj in idle_objects)
    del idle_objects
    started = time.monotonic()
    client = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", str(port), "--streams", str(streams), stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        line = (await client.stdout.readline()).split()
        if line[:1] != [b"open"]:
            raise RuntimeError(f"the client failed: {line!r}")
        refused = int(line[1])
        opened_in = time.monotonic() - started
        await asyncio.sleep(2.0)  # the last messages are read
        gc.collect()
        loaded_mb = rss_mb()
        objects = gc.get_objects()
        kinds: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        for obj in objects:
            kinds[type(obj).__qualname__] += 1
            sizes[type(obj).__qualname__] += sys.getsizeof(obj)
        extra = len(objects) - idle_count
        del objects
    finally:
        client.kill()
        await client.wait()
        await server.stop(None)
    return {
        "streams": streams,
        "opened_in_seconds": round(opened_in, 1),
        "refused": refused,
        "rss_idle_mb": round(idle_mb, 1),
        "rss_open_mb": round(loaded_mb, 1),
        "rss_per_stream_kb": round((loaded_mb - idle_mb) * 1024 / streams, 1),
        "gc_objects_per_stream": round(extra / streams, 1),
        "python_bytes_per_stream": round((sum(sizes.values()) - idle_bytes) / streams),
        "largest_kinds": [(kind, kinds[kind], round(size / streams)) for kind, size in sizes.most_common(8)],
    }


async def hold_streams(port: int, streams: int) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(-(-streams // STREAMS_PER_CHANNEL))]
    calls = []
    refused = 0
    while len(calls) < streams:
        call = channels[len(calls) % len(channels)].stream_stream(METHOD)()
        try:
            await call.write(b"x" * 20)
        except grpc.aio.AioRpcError:
            refused += 1  # see the docstring: the stream is opened again
            continue
        calls.append(call)
    print("open", refused, flush=True)
    await asyncio.Event().wait()  # until the server's process kills this one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(hold_streams(args.client, args.streams))
        return
    report = asyncio.run(serve(args.streams))
    opened = f"{report['streams']} streams open in {report['opened_in_seconds']} s"
    print(f"{opened} ({report['refused']} refused, opened again)")
    print(f"server RSS: {report['rss_idle_mb']} MB idle, {report['rss_open_mb']} MB with the streams open")
    print(f"per stream: {report['rss_per_stream_kb']} KB of RSS, {report['gc_objects_per_stream']} tracked objects")
    print(f"  of which Python objects (shallow sizes): {report['python_bytes_per_stream']} bytes; the largest kinds:")
    for kind, count, size in report["largest_kinds"]:
        print(f"    {kind:50s} {count / report['streams']:5.1f} a stream {size:6d} bytes a stream")


if __name__ == "__main__":
    main()
