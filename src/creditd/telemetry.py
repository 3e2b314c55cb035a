"""Traces and metrics (OpenTelemetry), and the RPC interceptor that feeds them and the logs.

Metrics are always collected in process and cost a few microseconds per call; they are
exported on a Prometheus scrape endpoint when `CREDITD_METRICS_LISTEN` is set and over
OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Spans are recorded only when there
is somewhere to send them (OTLP, or a span processor added by a test): otherwise no span
is created at all, so the hot path pays nothing for tracing.

One span per RPC (`creditd.v1.MeteringService/Authorize`, ...), with child spans around
the hot store operations and the database writes. Metrics, as named for Prometheus:

- `rpc_server_call_duration_seconds{rpc_service, rpc_method, rpc_grpc_status_code}`
- `creditd_authorizations_total{channel, outcome, reason}`: outcome allowed, denied or
  error; reason the deny reason or the error's ErrorInfo reason
- `creditd_sessions_live{channel}`: voice sessions and SMS streams served by this replica
- `creditd_cutoffs_total{channel, reason}`
- `creditd_slice_renewals_total{outcome}`: full, partial (the final grant) or denied
- `creditd_sessions_settled_total{outcome}`: ended (SessionEnd) or cutoff
- `creditd_writebehind_lag_seconds`, `creditd_writebehind_records_total`
- `creditd_topups_total{kind, balance_type, outcome}` (applied, replayed, rejected) and
  `creditd_topup_micros_total{kind, balance_type}`
- `creditd_store_duration_seconds{store, op, outcome}`: the hot store (embedded, redis)
  and the database (sqlite, postgresql)
- `creditd_ready`, `creditd_store_up{store}`
- event-loop lateness and garbage-collection pauses: see creditd.stalls
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server

from creditd import __version__, logs
from creditd.api.errors import Malformed, lenient, reject
from creditd.config import Settings, host_port
from creditd.domain.records import DenyReason
from creditd.metrics import Metrics, MetricsExporter
from creditd.stalls import StallWatch

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
)
# Server statuses that are the server's fault (OpenTelemetry's gRPC conventions).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def deny_reason_name(value: int) -> str:
    try:
        return DenyReason(value).name.lower()
    except ValueError:
        return str(value)


class _Switch(Sampler):
    """Samples nothing until tracing is turned on, then follows the caller's decision
    (ParentBased) with OTEL_TRACES_SAMPLER_ARG as the ratio of new traces (default all)."""

    def __init__(self) -> None:
        self.enabled = False
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1") or 1)
        self._on = ParentBased(TraceIdRatioBased(ratio))

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        if not self.enabled:
            return SamplingResult(Decision.DROP)
        return self._on.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "creditd(on)" if self.enabled else "creditd(off)"


class Telemetry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        attributes: dict[str, str] = {"service.version": __version__}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "creditd"
        resource = Resource.create(attributes)
        self._sampler = _Switch()
        self.tracer_provider = TracerProvider(resource=resource, sampler=self._sampler)
        self.tracer = self.tracer_provider.get_tracer("creditd", __version__)
        self.tracing = False
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = Metrics(InstrumentationScope("creditd", __version__))
        self.registry.register(self.metrics)
        readers: list[MetricReader] = [_prometheus_reader(self.registry)]
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            endpoint = settings.otlp_endpoint
            exporter = MetricsExporter(OTLPMetricExporter(endpoint=endpoint), self.metrics)
            readers.append(PeriodicExportingMetricReader(exporter))
            self.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        meter = self.meter_provider.get_meter("creditd", __version__)
        self.rpc_duration = self.metrics.histogram(
            "rpc.server.call.duration",
            "Duration of RPCs, streams included, by method and status",
            ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code"),
            SECONDS_BUCKETS,
        )
        self.authorizations = self.metrics.counter(
            meter,
            "creditd.authorizations",
            "Authorize answers by outcome (allowed, denied, error) and reason",
            ("channel", "outcome", "reason"),
        )
        self.cutoffs = self.metrics.counter(
            meter, "creditd.cutoffs", "Sessions cut off, by channel and reason", ("channel", "reason")
        )
        self.renewals = self.metrics.counter(
            meter,
            "creditd.slice.renewals",
            "Slice renewals of live voice sessions: full, partial or denied",
            ("outcome",),
        )
        self.settled = self.metrics.counter(
            meter, "creditd.sessions.settled", "Voice sessions settled: ended by the caller or cut off", ("outcome",)
        )
        self.topups = meter.create_counter(
            "creditd.topups", description="Top-ups by kind, balance type and outcome (applied, replayed, rejected)"
        )
        self.topup_micros = meter.create_counter(
            "creditd.topup.micros", description="Micro-credits credited by applied top-ups"
        )
        self.flushed = meter.create_counter(
            "creditd.writebehind.records", description="Records written behind to the database"
        )
        self.store_duration = self.metrics.histogram(
            "creditd.store.duration",
            "Hot store and database operations, by store, operation and outcome",
            ("store", "op", "outcome"),
            SECONDS_BUCKETS,
        )
        meter.create_observable_gauge(
            "creditd.sessions.live", callbacks=[self._observe_live], description="Live sessions on this replica"
        )
        meter.create_observable_gauge(
            "creditd.writebehind.lag",
            callbacks=[self._observe_lag],
            unit="s",
            description="Age of the oldest record not yet written to the database",
        )
        meter.create_observable_gauge(
            "creditd.ready", callbacks=[self._observe_ready], description="1 while this replica takes new sessions"
        )
        meter.create_observable_gauge(
            "creditd.store.up", callbacks=[self._observe_stores], description="1 while a store answers"
        )
        meter.create_observable_counter(
            "creditd.redis.pipelined",
            callbacks=[self._observe_pipelining],
            description="The hot path's Redis connection: socket writes made and commands they carried"
            " (commands / writes is the batch size the coalescing achieves)",
        )
        self._connection: Any = None
        self.stalls = StallWatch(meter)  # started by the app, on its event loop
        self._live: Callable[[], Iterable[tuple[str, int]]] | None = None
        self._lag: Callable[[], float] | None = None
        self._status: Any = None
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.metrics_address = ""

    # -- lifecycle ----------------------------------------------------------------------

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """Record spans from now on and hand them to `processor` (an exporter's)."""
        self.tracer_provider.add_span_processor(processor)
        self._sampler.enabled = True
        self.tracing = True

    def start(self) -> None:
        """Open the Prometheus scrape endpoint if one is configured."""
        if not self.settings.metrics_listen:
            return
        host, port = host_port(self.settings.metrics_listen, "CREDITD_METRICS_LISTEN")
        try:
            self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise SystemExit(f"cannot serve metrics on {self.settings.metrics_listen}: {exc}") from exc
        shown = f"[{host}]" if ":" in host else host
        self.metrics_address = f"{shown}:{self._http.server_port}"

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        with contextlib.suppress(Exception):
            self.meter_provider.shutdown(timeout_millis=3000)
        with contextlib.suppress(Exception):
            self.tracer_provider.shutdown()

    def observe(
        self,
        live: Callable[[], Iterable[tuple[str, int]]],
        lag: Callable[[], float],
        status: Any,
    ) -> None:
        """What the gauges read when collected: live sessions per channel, the write-behind
        lag and the health status (store_ok, db_ok, serving)."""
        self._live, self._lag, self._status = live, lag, status

    def _observe_live(self, _: CallbackOptions) -> Iterable[Observation]:
        if self._live is None:
            return []
        return [Observation(count, {"channel": channel}) for channel, count in self._live()]

    def _observe_lag(self, _: CallbackOptions) -> Iterable[Observation]:
        return [] if self._lag is None else [Observation(self._lag())]

    def _observe_ready(self, _: CallbackOptions) -> Iterable[Observation]:
        return [] if self._status is None else [Observation(int(self._status.serving))]

    def _observe_stores(self, _: CallbackOptions) -> Iterable[Observation]:
        if self._status is None:
            return []
        return [
            Observation(int(self._status.store_ok), {"store": "hot"}),
            Observation(int(self._status.db_ok), {"store": "database"}),
        ]

    def _observe_pipelining(self, _: CallbackOptions) -> Iterable[Observation]:
        connection = self._connection
        if connection is None:
            return []
        return [
            Observation(connection.writes, {"count": "writes"}),
            Observation(connection.commands, {"count": "commands"}),
        ]

    # -- what the servicers report ------------------------------------------------------

    def authorization(self, channel: str, outcome: str, reason: str) -> None:
        self.authorizations.add((channel, outcome, reason))

    def cutoff(self, channel: str, reason: int) -> None:
        self.cutoffs.add((channel, deny_reason_name(reason)))

    # -- stores -------------------------------------------------------------------------

    def instrument_store(self, store: Any, system: str) -> None:
        """Time (and trace) the hot store's operations on this instance, and count what
        their results say: renewals, cutoffs and settlements."""
        self._connection = getattr(store, "connection", None)  # a standalone Redis's hot-path connection
        for op in ("read_wallet", "session", "take_records", "ack_records", "apply_topup", "debit_sms"):
            self._instrument(store, op, system)
        self._instrument(store, "reserve", system, self._after_reserve)
        self._instrument(store, "settle", system, self._after_settle)

    def instrument_database(self, db: Any, system: str) -> None:
        self._instrument(db, "write_records", system, self._after_write)
        self._instrument(db, "insert_topup", system, self._after_topup)

    def _instrument(
        self,
        target: Any,
        op: str,
        system: str,
        after: Callable[[tuple[Any, ...], Any], None] | None = None,
    ) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(target, op)
        record = self.store_duration.observe
        ok = (system, op, "ok")
        failed = (system, op, "error")
        span_name = f"{system} {op}"
        span_attributes = {"db.system.name": system, "db.operation.name": op}
        telemetry = self

        async def instrumented(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                if telemetry.tracing:
                    with telemetry.tracer.start_as_current_span(
                        span_name, kind=SpanKind.CLIENT, attributes=span_attributes
                    ):
                        result = await original(*args, **kwargs)
                else:
                    result = await original(*args, **kwargs)
            except BaseException:
                record(failed, time.perf_counter() - started)
                raise
            record(ok, time.perf_counter() - started)
            if after is not None:
                try:
                    after(args, result)
                except Exception:  # counting must never break the operation
                    log.exception("telemetry of %s failed", op)
            return result

        instrumented.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(target, op, instrumented)

    def _after_reserve(self, args: tuple[Any, ...], result: Any) -> None:
        request = args[0]
        if request.open is not None:  # the first slice, reserved by Authorize
            return
        if result.granted_seconds >= request.want_seconds:
            outcome = "full"
        elif result.granted_seconds > 0:
            outcome = "partial"
        else:
            outcome = "denied"
        self.renewals.add((outcome,))

    def _after_settle(self, args: tuple[Any, ...], result: Any) -> None:
        if result.already_settled:
            return
        reason = args[0].cutoff_reason
        if reason:
            self.cutoff("voice", reason)
        self.settled.add(("cutoff" if reason else "ended",))

    def _after_write(self, args: tuple[Any, ...], _: Any) -> None:
        self.flushed.add(len(args[0]))

    def _after_topup(self, args: tuple[Any, ...], result: Any) -> None:
        entry, fingerprint = args[1], args[2]  # (agency_id, entry, fingerprint, event)
        original, original_fingerprint, created = result
        labels = {
            "kind": entry.topup_kind.name.lower() if entry.topup_kind is not None else "",
            "balance_type": entry.balance_type.name.lower(),
        }
        if created:
            self.topups.add(1, {**labels, "outcome": "applied"})
            self.topup_micros.add(original.amount_micros, labels)
        else:
            outcome = "replayed" if original_fingerprint == fingerprint else "rejected"
            self.topups.add(1, {**labels, "outcome": outcome})

    # -- RPCs ---------------------------------------------------------------------------

    def interceptor(self) -> RpcInterceptor:
        return RpcInterceptor(self)


def _prometheus_reader(registry: CollectorRegistry) -> MetricReader:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    reader: MetricReader = PrometheusMetricReader(registry=registry)
    return reader


def _status(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """For every call: a request id (the caller's `x-request-id`, or a new one) and the
    session id in the log context, a span when tracing is on, the duration metric, and an
    INVALID_ARGUMENT with ErrorInfo (reason MALFORMED_REQUEST) for a request that is not a
    valid protobuf message of the method's type."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self._handlers: dict[str, tuple[Any, Any]] = {}
        self._labels: dict[tuple[str, grpc.StatusCode], tuple[str, ...]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        known = self._handlers.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._handlers[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        service, _, name = method.lstrip("/").rpartition("/")
        ours = service.startswith("creditd.")
        parse = handler.request_deserializer
        request_type = getattr(parse, "__self__", None)
        fields = getattr(getattr(request_type, "DESCRIPTOR", None), "fields_by_name", {})
        has_session = "session_id" in fields
        if ours:
            parse = lenient(parse)
        enter = self._enter_call
        leave = self._leave_call

        if handler.unary_unary is not None or handler.stream_unary is not None:
            behavior = handler.unary_unary or handler.stream_unary
            streaming_in = handler.stream_unary is not None
            factory = grpc.stream_unary_rpc_method_handler if streaming_in else grpc.unary_unary_rpc_method_handler
        else:
            behavior = handler.unary_stream or handler.stream_stream
            streaming_in = handler.stream_stream is not None
            factory = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
        # The session a call's one request names goes into the log context; a stream's
        # messages are checked by its handler as it reads them (Malformed).
        one_request = not streaming_in
        session_of = one_request and has_session

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                state = enter(method, service, name, context, request if session_of else None)
                error: BaseException | None = None
                try:
                    if one_request and isinstance(request, Malformed):
                        reject(context, request.error(method))
                        return
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    leave(state, context, error)
                    error = None  # else this frame and the error's traceback would hold each other

            return factory(stream, request_deserializer=parse, response_serializer=handler.response_serializer)

        # One response, or a stream written with context.write (StreamUsage).
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            state = enter(method, service, name, context, request if session_of else None)
            error: BaseException | None = None
            try:
                if one_request and isinstance(request, Malformed):
                    reject(context, request.error(method))
                    return None
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                leave(state, context, error)
                error = None  # else this frame and the error's traceback would hold each other

        return factory(call, request_deserializer=parse, response_serializer=handler.response_serializer)

    def _enter_call(
        self,
        method: str,
        service: str,
        name: str,
        context: grpc.aio.ServicerContext[Any, Any],
        request: Any,
    ) -> tuple[Any, ...]:
        metadata = context.invocation_metadata() or ()
        request_id = None
        for key, value in metadata:
            if key == "x-request-id" and isinstance(value, str):
                request_id = logs.caller_request_id(value)
                break
        request_token = logs.request_id.set(request_id or logs.new_request_id())
        session_token = None
        if request is not None and not isinstance(request, Malformed) and request.session_id:
            session_token = logs.session_id.set(request.session_id[: logs.MAX_LOGGED_ID])
        span = None
        context_token = None
        telemetry = self.telemetry
        if telemetry.tracing:
            carrier = {k: v for k, v in metadata if isinstance(v, str)}
            parent = propagate.extract(carrier)
            span = telemetry.tracer.start_span(
                f"{service}/{name}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            )
            context_token = otel_context.attach(trace.set_span_in_context(span, parent))
        return (method, service, name, time.perf_counter(), request_token, session_token, span, context_token)

    def _leave_call(
        self, state: tuple[Any, ...], context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
    ) -> None:
        method, service, name, started, request_token, session_token, span, context_token = state
        elapsed = time.perf_counter() - started
        code = _status(context, error)
        key = (method, code)
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels[key] = ("grpc", service, name, str(code.value[0]))
        self.telemetry.rpc_duration.observe(labels, elapsed)
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERRORS:
                span.set_status(StatusCode.ERROR, code.name)
            span.end()
            with contextlib.suppress(Exception):
                otel_context.detach(context_token)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s %.2f ms",
                method,
                code.name,
                elapsed * 1000,
                extra={"rpc_method": method, "grpc_status": code.name, "duration_ms": round(elapsed * 1000, 3)},
            )
        with contextlib.suppress(ValueError):  # a generator closed in another context
            if session_token is not None:
                logs.session_id.reset(session_token)
        with contextlib.suppress(ValueError):
            logs.request_id.reset(request_token)
