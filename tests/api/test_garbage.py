"""Calls leave no cycles behind on the server: `creditd serve` freezes whatever survives a
tenth of a second (creditd.gc_tuning), so a cycle that outlives that is never freed. Every
kind of call must be freed by reference counting alone: answered, refused with an error
(the status is set, not raised as gRPC's AbortError, whose traceback holds the call),
malformed, and dropped mid-call."""

from __future__ import annotations

import gc
from typing import Any

import grpc
from creditd_client.v1 import metering_pb2

from tests.calls import Call, session, until
from tests.conftest import CREDIT, Running


def _server_side(obj: Any) -> bool:
    kind = type(obj)
    if kind.__name__ == "frame":
        return "/creditd/" in obj.f_code.co_filename
    # Server objects: creditd's own (its messages are creditd.v1, the client's creditd_client.v1),
    # the write-behind's SQL statements and gRPC's per-call state.
    module = kind.__module__
    if isinstance(module, str) and module.startswith(("creditd", "sqlalchemy")):  # Cython's types: not a str
        return True
    return kind.__name__ in ("RPCState", "_ServicerContext", "AbortError")


async def test_no_kind_of_call_leaves_a_cycle(server: Running) -> None:
    api = server.api
    await api.agency("a1", free_voice_micros=1_000 * CREDIT)
    await api.plan("a1", "p", free_voice_micros=1_000 * CREDIT)
    await api.client("c1", "a1", "p")
    await api.authorize("warm", "c1")  # first-use caches are not garbage
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(3):
            # refused: a handler's error, a check at the edge, an unknown account
            for session_id, client_id in ((f"bad{i}", "a1"), ("", "c1"), (f"nobody{i}", "nobody")):
                try:
                    await api.authorize(session_id, client_id)
                except grpc.aio.AioRpcError:
                    pass
                else:
                    raise AssertionError("the request was not refused")
            # malformed bytes
            raw = api.channel.unary_unary("/creditd.v1.MeteringService/Authorize")
            try:
                await raw(b"\xff\xff\xff", metadata=api.metadata)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            # answered and ended
            await api.authorize(f"s{i}", "c1")
            call = Call(api)
            await call.start(f"s{i}", "c1")
            await call.report(1)
            assert (await call.end(1)).WhichOneof("msg") == "summary"
            # a stream refused at its first message
            refused = Call(api)
            await refused.call.write(
                metering_pb2.StreamUsageRequest(start=metering_pb2.SessionStart(session_id="never", client_id="c1"))
            )
            await until(lambda c=refused: c.closed, "the refused stream ended")  # type: ignore[misc]
            # dropped mid-call
            await api.authorize(f"d{i}", "c1")
            dropped = Call(api)
            await dropped.start(f"d{i}", "c1")
            dropped.call.cancel()
            await until(lambda n=f"d{i}": session(server, n).stream is None, "the server noticed the drop")  # type: ignore[union-attr,misc]
        gc.collect()
        garbage = [o for o in gc.garbage if _server_side(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    kinds = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in garbage})
    assert not garbage, f"server objects freed only by the cycle collector: {kinds}"


def _server_generators() -> int:
    """Async generators of the server's call path alive now (the handler's, the interceptor's,
    gRPC's request iterator), found by their names."""
    names = ("MeteringServicer.", "RpcInterceptor.", "_MessageReceiver.")
    return sum(
        1
        for obj in gc.get_objects()
        if type(obj).__name__ == "async_generator" and str(getattr(obj, "__qualname__", "")).startswith(names)
    )


async def test_a_live_call_keeps_no_generator_on_the_server(server: Running) -> None:
    """A live call waits for its next report as two coroutines (MeteringServicer.StreamUsage in
    gRPC's reader/writer style). Each async generator layer would keep a frame, a weak
    reference and a finalizer hook for the whole call: 3 KB a call, 30 MB at 10,000 calls."""
    api = server.api
    await api.agency("a1", free_voice_micros=1_000 * CREDIT)
    await api.plan("a1", "p", free_voice_micros=1_000 * CREDIT)
    await api.client("c1", "a1", "p")
    before = _server_generators()
    calls = []
    for i in range(5):
        await api.authorize(f"g{i}", "c1")
        call = Call(api)
        await call.start(f"g{i}", "c1")
        await call.report(1)
        calls.append(call)
    assert _server_generators() == before
    for call in calls:
        assert (await call.end(1)).WhichOneof("msg") == "summary"
