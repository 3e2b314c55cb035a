"""Metrics on the Prometheus endpoint, spans per RPC and per store operation, OTLP export."""

from __future__ import annotations

import asyncio
import gc
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from creditd_client.v1 import common_pb2, metering_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from creditd.stalls import HEARTBEAT_SECONDS
from tests.conftest import CREDIT, Api, ServerFactory

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

Sample = tuple[str, dict[str, str], float]


def _scrape(address: str) -> list[Sample]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _find(samples: list[Sample], name: str, **labels: str) -> list[float]:
    return [value for n, have, value in samples if n == name and labels.items() <= have.items()]


async def _rated_client(api: Api, client: str, credits: int) -> None:
    """A client at 60 credits a minute (1 credit a second) holding `credits` credits."""
    await api.plan("a1", f"plan-{client}", default_voice_micros_per_minute=60 * CREDIT)
    await api.client(client, "a1", f"plan-{client}")
    if credits:
        await api.topup(client, credits * CREDIT, f"topup-{client}")


async def test_the_metrics_endpoint_shows_authorizations_cutoffs_renewals_and_stores(
    make_server: ServerFactory,
) -> None:
    async with make_server(
        metrics_listen="127.0.0.1:0", slice_seconds=2, renewal_lead_seconds=1.0, warning_seconds=1.0
    ) as running:
        api = running.api
        assert running.app.metrics_address.startswith("127.0.0.1:")
        await api.agency("a1")
        await _rated_client(api, "rich", 3)
        await _rated_client(api, "broke", 0)
        assert not (await api.authorize("denied-call", "broke")).allowed
        assert (await api.authorize("call", "rich")).allowed
        call, _ = await api.start_call("call", "rich")
        live = _scrape(running.app.metrics_address)
        assert _find(live, "creditd_sessions_live", channel="voice") == [1.0]
        while True:  # 2 s granted, a partial renewal of 1 s at second 1, then the cutoff at second 3
            message = await asyncio.wait_for(call.read(), 10)
            if message.WhichOneof("msg") == "cutoff":
                assert message.cutoff.reason == common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED
                break
        await asyncio.sleep(0.2)  # the settlement is written behind
        samples = await asyncio.to_thread(_scrape, running.app.metrics_address)

    def one(name: str, **labels: str) -> float:
        found = _find(samples, name, **labels)
        assert len(found) == 1, (name, labels, [s for s in samples if s[0] == name])
        return found[0]

    assert one("creditd_authorizations_total", channel="voice", outcome="allowed", reason="none") == 1
    assert one("creditd_authorizations_total", outcome="denied", reason="client_credits_exhausted") == 1
    assert one("creditd_cutoffs_total", channel="voice", reason="client_credits_exhausted") == 1
    assert one("creditd_sessions_settled_total", outcome="cutoff") == 1
    assert one("creditd_slice_renewals_total", outcome="partial") == 1
    assert one("creditd_sessions_live", channel="voice") == 0
    assert one("creditd_topups_total", kind="purchase", balance_type="voice", outcome="applied") == 1
    assert one("creditd_topup_micros_total", kind="purchase", balance_type="voice") == 3 * CREDIT
    assert one("creditd_writebehind_lag_seconds") >= 0
    assert one("creditd_writebehind_records_total") > 0
    assert one("creditd_ready") == 1
    assert one("creditd_store_up", store="hot") == one("creditd_store_up", store="database") == 1
    for op in ("reserve", "settle", "apply_topup"):
        assert one("creditd_store_duration_seconds_count", store="embedded", op=op, outcome="ok") >= 1
    assert one("creditd_store_duration_seconds_count", store="sqlite", op="write_records", outcome="ok") >= 1
    assert _find(samples, "creditd_store_duration_seconds_bucket", store="embedded", op="reserve", le="0.001")
    authorize_ok = {"rpc_service": "creditd.v1.MeteringService", "rpc_method": "Authorize", "rpc_grpc_status_code": "0"}
    assert one("rpc_server_call_duration_seconds_count", **authorize_ok) == 2


async def test_no_metrics_endpoint_unless_configured(make_server: ServerFactory) -> None:
    async with make_server() as running:
        assert running.app.metrics_address == ""
        assert not running.app.telemetry.tracing  # and no span is made without an exporter


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def _named(finished: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    matching = [s for s in finished if s.name == name]
    assert len(matching) == 1, (name, [s.name for s in finished])
    return matching[0]


async def _finished(spans: InMemorySpanExporter, name: str, seconds: float = 10.0) -> ReadableSpan:
    """The span `name` once the server has ended it: the server ends an RPC's span after
    the status is sent, so the caller may see the status first."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not any(span.name == name for span in spans.get_finished_spans()):
        assert asyncio.get_running_loop().time() < deadline, f"no finished span {name!r}"
        await asyncio.sleep(0.01)
    return _named(spans.get_finished_spans(), name)


async def test_every_rpc_gets_a_span_with_the_store_work_inside_it(
    make_server: ServerFactory, spans: InMemorySpanExporter
) -> None:
    async with make_server() as running:
        api = running.api
        running.app.telemetry.add_span_processor(SimpleSpanProcessor(spans))
        await api.agency("a1")
        await _rated_client(api, "c1", 5)
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        traced = api.as_key(api.token)
        traced.metadata = (*api.metadata, ("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"))
        assert (await traced.authorize("s1", "c1")).allowed
        await asyncio.sleep(0.2)  # a write-behind batch
        finished = spans.get_finished_spans()

    authorize = _named(finished, "creditd.v1.MeteringService/Authorize")
    assert authorize.kind is SpanKind.SERVER
    assert authorize.attributes is not None
    assert authorize.attributes["rpc.method"] == "Authorize"
    assert authorize.attributes["rpc.grpc.status_code"] == 0
    assert format(authorize.context.trace_id, "032x") == trace_id  # joined the caller's trace
    reserve = _named(finished, "embedded reserve")
    assert reserve.kind is SpanKind.CLIENT
    assert reserve.parent is not None and reserve.parent.span_id == authorize.context.span_id
    topup = _named(finished, "creditd.v1.LedgerService/Topup")
    children = {s.name for s in finished if s.parent is not None and s.parent.span_id == topup.context.span_id}
    assert {"sqlite insert_topup", "embedded apply_topup"} <= children
    assert any(s.name == "sqlite write_records" for s in finished)
    create = _named(finished, "creditd.v1.AccountService/CreateAgency")
    assert create.attributes is not None and create.attributes["rpc.grpc.status_code"] == 0


async def test_a_failed_call_is_marked_on_its_span(make_server: ServerFactory, spans: InMemorySpanExporter) -> None:
    async with make_server() as running:
        running.app.telemetry.add_span_processor(SimpleSpanProcessor(spans))
        with pytest.raises(grpc.aio.AioRpcError):
            await running.api.balance("nobody")
        span = await _finished(spans, "creditd.v1.LedgerService/GetBalance")
        assert (
            span.attributes is not None
            and span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
        )


class _Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A stand-in OpenTelemetry collector that keeps what it receives."""

    def __init__(self) -> None:
        self.spans: list[str] = []
        self.metrics: list[str] = []

    async def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans += [span.name for span in scope.spans]
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                self.metrics += [metric.name for metric in scope.metrics]
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def test_traces_and_metrics_are_exported_over_otlp_when_an_endpoint_is_set(
    make_server: ServerFactory,
) -> None:
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with make_server(otlp_endpoint=f"http://127.0.0.1:{port}") as running:
            assert running.app.telemetry.tracing
            await running.api.agency("a1")
            await _rated_client(running.api, "c1", 1)
            assert (await running.api.authorize("s1", "c1")).allowed
        # Stopping the server flushes both exporters.
        assert "creditd.v1.MeteringService/Authorize" in collector.spans
        assert "embedded reserve" in collector.spans
        assert {"creditd.authorizations", "creditd.store.duration", "rpc.server.call.duration"} <= set(
            collector.metrics
        )
    finally:
        await server.stop(0)


async def test_authorize_answers_count_by_reason_also_for_errors(make_server: ServerFactory) -> None:
    async with make_server(metrics_listen="127.0.0.1:0") as running:
        with pytest.raises(grpc.aio.AioRpcError):
            await running.api.metering.Authorize(
                metering_pb2.AuthorizeRequest(session_id="s", client_id="nobody", channel=common_pb2.CHANNEL_VOICE),
                metadata=running.api.metadata,
            )
        samples = await asyncio.to_thread(_scrape, running.app.metrics_address)
    assert _find(samples, "creditd_authorizations_total", outcome="error", reason="invalid_argument") == [1.0]


async def _scraped(address: str, name: str, at_least: float, **labels: str) -> float:
    """Scrape until the sample `name{labels}` reaches `at_least` (the heartbeat records on its
    next tick); returns its value, or fails after a generous deadline."""
    deadline = asyncio.get_running_loop().time() + 10
    value = float("-inf")
    while asyncio.get_running_loop().time() < deadline:
        found = _find(await asyncio.to_thread(_scrape, address), name, **labels)
        value = max(found, default=float("-inf"))
        if value >= at_least:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} is {value}, never reached {at_least}")


def _late_ticks(samples: list[Sample]) -> tuple[float, float]:
    """Heartbeat ticks recorded so far: all of them, and those more than 50 ms late."""
    total = _find(samples, "creditd_event_loop_lateness_seconds_bucket", le="+Inf")[0]
    return total, total - _find(samples, "creditd_event_loop_lateness_seconds_bucket", le="0.05")[0]


async def test_a_blocked_event_loop_shows_as_heartbeat_lateness(make_server: ServerFactory) -> None:
    async with make_server(metrics_listen="127.0.0.1:0") as running:
        address = running.app.metrics_address
        await _scraped(address, "creditd_event_loop_lateness_seconds_count", 1)
        ticks, late_ticks = _late_ticks(await asyncio.to_thread(_scrape, address))
        time.sleep(0.1)  # noqa: ASYNC251 - the stall under test: the server runs on this loop
        # A stall of 100 ms makes the next tick at least 100 ms minus one heartbeat late.
        await _scraped(address, "creditd_event_loop_lateness_max_seconds", 0.1 - HEARTBEAT_SECONDS)
        now_ticks, now_late_ticks = _late_ticks(await asyncio.to_thread(_scrape, address))
        assert now_ticks > ticks
        assert now_late_ticks >= late_ticks + 1  # and that tick is in the histogram


async def test_garbage_collections_are_timed_by_generation(make_server: ServerFactory) -> None:
    async with make_server(metrics_listen="127.0.0.1:0") as running:
        address = running.app.metrics_address
        before = _find(await asyncio.to_thread(_scrape, address), "creditd_gc_pause_seconds_count", generation="2")
        collections = _find(await asyncio.to_thread(_scrape, address), "creditd_gc_collections_total", generation="2")
        garbage = [[i] for i in range(200_000)]  # something for the collection to walk
        gc.collect()
        del garbage
        await _scraped(address, "creditd_gc_pause_seconds_count", sum(before) + 1, generation="2")
        samples = await asyncio.to_thread(_scrape, address)
        assert _find(samples, "creditd_gc_pause_seconds_sum", generation="2")[0] > 0
        assert _find(samples, "creditd_gc_pause_max_seconds", generation="2")[0] > 0
        assert _find(samples, "creditd_gc_collections_total", generation="2")[0] >= collections[0] + 1
        watch = running.app.telemetry.stalls
    assert watch._on_gc not in gc.callbacks  # a stopped server leaves no GC callback behind
