"""Assembly of one creditd replica: stores, engine and gRPC server, started and stopped in order.

Health (grpc.health.v1): the service "" is liveness: SERVING from start until the process
stops, whatever the stores do, so that an orchestrator never restarts a replica because
Redis or Postgres is away (a restart would not bring them back). Each creditd.v1 service
name is readiness: NOT_SERVING while the hot store or the database cannot be reached and
while the replica drains for shutdown, SERVING again when they answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable
from pathlib import Path

import grpc
from creditd_client.v1 import (
    account_pb2,
    account_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import make_url

from creditd import logs
from creditd.api.auth import Authenticator
from creditd.api.servicers import AccountServicer, LedgerServicer, MeteringServicer
from creditd.config import Settings
from creditd.db import Database
from creditd.db.migrate import upgrade_if_behind
from creditd.domain.records import DenyReason
from creditd.engine.accounts import Accounts
from creditd.engine.clock import Clock, RealClock
from creditd.engine.context import Context
from creditd.engine.durability import Flusher, rebuild
from creditd.engine.health import Monitor
from creditd.engine.ledger import Ledger
from creditd.engine.metering import Metering
from creditd.store.base import HotStore
from creditd.store.bus import LocalBus
from creditd.store.embedded import RETENTION_SECONDS, EmbeddedHotStore
from creditd.store.redis import RedisHotStore
from creditd.store.redis_bus import RedisBus
from creditd.store.redis_client import is_cluster
from creditd.telemetry import Telemetry

log = logging.getLogger(__name__)
STORE_LOST = "store:lost"  # bus notification: a replica found the hot store's data gone and rebuilds it
SERVICE_NAMES = (
    metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name,
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _migrate(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    upgrade_if_behind(url)


async def migrate(url: str) -> None:
    """Create the database file's folder if needed and bring the schema to the newest version."""
    await asyncio.to_thread(_migrate, url)


async def make_store(settings: Settings) -> tuple[HotStore, LocalBus]:
    """The hot store and the bus: in process, or shared by every replica through Redis
    (one Redis, or a Redis Cluster: asked of the node the URL names unless configured)."""
    if settings.redis_url:
        cluster = await is_cluster(settings.redis_url, settings.redis_mode)
        return (
            RedisHotStore(
                settings.redis_url, settings.redis_prefix, settled_ttl_seconds=RETENTION_SECONDS, cluster=cluster
            ),
            RedisBus(settings.redis_url, settings.redis_prefix, cluster=cluster),
        )
    return EmbeddedHotStore(), LocalBus()


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Off unless asked for: a second server on a taken port must fail, not share it.
        ("grpc.so_reuseport", int(settings.reuse_port)),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Clients may ping no more often than this; a client that does gets GOAWAY
        # (too_many_pings) after max_ping_strikes pings.
        ("grpc.http2.min_ping_interval_without_data_ms", settings.keepalive_min_seconds * 1000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", settings.keepalive_min_seconds * 1000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
        # The server pings its peers too: a caller that vanished without closing its
        # connection (a dead host, a cut network) is found within time + timeout, and its
        # usage stream ends like a dropped one instead of renewing slices forever.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),  # what gRPC >= 1.6x reads
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key).read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


STOP_STEP_SECONDS = 10.0


async def _bounded(name: str, step: Awaitable[object], seconds: float = STOP_STEP_SECONDS) -> None:
    """Run one shutdown step, but never let it hold the process: what is left of it after
    `seconds` is abandoned (sessions still open are settled by recovery or the lease)."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.error("shutdown step %r did not finish in %.0fs; going on without it", name, seconds)
    elif task.exception() is not None:
        log.error("shutdown step %r failed: %s", name, task.exception())


class App:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or RealClock()
        self.admin_token = settings.admin_token or f"cdk_bootstrap_{secrets.token_urlsafe(24).replace('_', '-')}"
        logs.add_secret(self.admin_token)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.health = health.aio.HealthServicer()
        self.telemetry = Telemetry(settings)

    async def start(self) -> None:
        settings = self.settings
        self.telemetry.start()
        self.telemetry.stalls.start()
        if is_sqlite(settings.database_url):
            await migrate(settings.database_url)
        self.db = Database(settings.database_url)
        self.telemetry.instrument_database(self.db, make_url(settings.database_url).get_backend_name())
        await self.db.ping()
        store, bus = await make_store(settings)
        self.telemetry.instrument_store(store, "redis" if settings.redis_url else "embedded")
        self.ctx = Context(settings, store, self.db, bus, self.clock)
        await self.ctx.bus.start()
        await self.ctx.catalog.load()
        if await self.ctx.store.ping() is False:  # empty (a new process, or Redis lost its data)
            settled = await self._rebuild_once()
            if settled:
                log.warning("settled %d sessions left open by an earlier run", settled)
        elif lost := await self._lost_agencies():  # a cluster's shard that came back empty
            await self._rebuild_agencies(lost)
        self.flusher = Flusher(self.ctx)
        self.flusher.start()
        self.metering = Metering(self.ctx)
        await self.metering.start()
        self.auth = Authenticator(self.ctx, self.admin_token)
        await self.auth.start()
        self.ctx.status.lag = self.flusher.lag_seconds
        metering = self.metering
        self.telemetry.observe(
            lambda: (("voice", len(metering.voice)), ("sms", len(metering.sms_streams))),
            self.flusher.lag_seconds,
            self.ctx.status,
        )
        self.monitor = Monitor(
            self.clock,
            self.ctx.status,
            self.ctx.store.ping,
            self.db.ping,
            self._serving_changed,
            self._rebuild_lost_store,
            self._lost_agencies,
            self._rebuild_agencies,
        )
        self.monitor.start()
        # An operation that finds the hot store's data gone, or another replica that says
        # so, makes the monitor check at once (readiness NOT_SERVING before the rebuild).
        self.ctx.store.loss_listeners.append(self.monitor.wake)
        watching = asyncio.Event()
        self._loss_watch = asyncio.create_task(self._watch_losses(watching), name="store-loss-watch")
        await watching.wait()

        server = grpc.aio.server(options=server_options(settings), interceptors=[self.telemetry.interceptor()])
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(
            MeteringServicer(self.ctx, self.auth, self.metering, self.telemetry), server
        )
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
            LedgerServicer(self.ctx, self.auth, Ledger(self.ctx, self.flusher.flush)), server
        )
        account_pb2_grpc.add_AccountServiceServicer_to_server(
            AccountServicer(self.ctx, self.auth, Accounts(self.ctx)), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        credentials = server_credentials(settings)
        if credentials is None:
            if not _loopback(settings.listen):
                log.warning("serving plaintext gRPC on %s: API keys cross the network unencrypted", settings.listen)
            self.port = server.add_insecure_port(settings.listen)
        else:
            self.port = server.add_secure_port(settings.listen, credentials)
        if not self.port:
            raise SystemExit(f"cannot listen on {settings.listen}")
        await server.start()
        self.server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness
        await self._set_readiness(self.ctx.status.serving)

    @property
    def metrics_address(self) -> str:
        """host:port of the Prometheus endpoint ("" when there is none)."""
        return self.telemetry.metrics_address

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def _set_readiness(self, serving: bool) -> None:
        """Readiness follows the stores and the drain; liveness ("") is left alone."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in SERVICE_NAMES:
            await self.health.set(name, status)

    async def _watch_losses(self, ready: asyncio.Event) -> None:
        async with self.ctx.bus.subscribe(lambda channel: channel == STORE_LOST) as queue:
            ready.set()
            while True:
                await queue.get()
                self.monitor.wake()

    async def _serving_changed(self, serving: bool) -> None:
        await self._set_readiness(serving)
        if serving:
            log.warning("ready again: both stores answer")
        elif self.ctx.status.rebuilding:
            log.warning("not ready: the hot store lost its data; UNAVAILABLE until it is rebuilt from the database")
        elif not self.ctx.status.draining:
            log.warning(
                "not ready: hot store %s, database %s",
                "up" if self.ctx.status.store_ok else "down",
                "up" if self.ctx.status.db_ok else "down",
            )

    async def _rebuild_lost_store(self) -> None:
        """The hot store lost its data: its live calls are gone with it. One replica rebuilds
        it from the database (settling the sessions the database knows as open); the others
        wait until it is whole."""
        log.warning("the hot store lost everything it held (Redis lost its data); its live calls here are cut")
        for session in list(self.metering.voice.sessions.values()):
            self.metering.voice.interrupt(session, DenyReason.SERVICE_UNAVAILABLE)
        await self._rebuild_once()
        self.ctx.store.lost.clear()

    async def _lost_agencies(self) -> set[str]:
        """Agencies whose state the hot store does not hold: those its operations found
        missing, and on a Redis Cluster (whose shards lose data one by one) every agency
        whose marker is gone."""
        store = self.ctx.store
        lost = set(store.lost)
        if store.sharded:
            agencies = await self.ctx.catalog.agency_ids()
            lost |= set(agencies) - await store.agencies_present(agencies)
        return lost

    async def _rebuild_agencies(self, agencies: set[str]) -> None:
        """Rebuild the state of these agencies alone (one replica does; the others wait)."""
        log.warning("the hot store lost the state of %d agencies; rebuilding it from the database", len(agencies))
        for session in [s for s in self.metering.voice.sessions.values() if s.agency_id in agencies]:
            self.metering.voice.interrupt(session, DenyReason.SERVICE_UNAVAILABLE)
        store = self.ctx.store
        async with store.rebuild_lock() as mine:
            missing = set(agencies) - await store.agencies_present(sorted(agencies))
            if mine and missing:
                await self.ctx.bus.publish(STORE_LOST)  # the other replicas check at once
                await rebuild(self.ctx, missing)
                return
        while set(agencies) - await store.agencies_present(sorted(agencies)):  # noqa: ASYNC110 - another replica rebuilds
            await asyncio.sleep(0.2)
        store.lost.difference_update(agencies)

    async def _rebuild_once(self) -> int:
        """Rebuild the empty hot store unless another replica does (or just did); returns the
        number of sessions this replica settled. Returns once the store is whole."""
        async with self.ctx.store.rebuild_lock() as mine:
            # Checked again under the lock: another replica may have finished meanwhile, and
            # a second rebuild would settle its sessions twice.
            if mine and await self.ctx.store.ping() is False:
                log.warning("rebuilding the hot store from the database here")
                await self.ctx.bus.publish(STORE_LOST)  # the other replicas check at once
                return await rebuild(self.ctx)
        if await self.ctx.store.ping() is False:
            log.warning("another replica rebuilds the hot store from the database; waiting for it")
        while await self.ctx.store.ping() is False:  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.2)
        return 0

    async def drain(self, seconds: float | None = None) -> None:
        """Stop taking sessions, let live calls end for `seconds` (`drain_seconds`), then cut
        and settle them. Calling it again with a shorter time cuts them sooner."""
        self.ctx.status.draining = True
        await self._set_readiness(False)
        wait = self.settings.drain_seconds if seconds is None else seconds
        await self.metering.drain(asyncio.get_running_loop().time() + wait)

    async def stop(self, grace: float = 1.0) -> None:
        self._loss_watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loss_watch
        await _bounded("monitor", self.monitor.close())
        await _bounded("health", self.health.enter_graceful_shutdown())
        if self.server is not None:
            await _bounded("grpc server", self.server.stop(grace), grace + STOP_STEP_SECONDS)
        await _bounded("auth", self.auth.close())
        await _bounded("metering", self.metering.close())
        await _bounded("write-behind", self.flusher.close())
        await _bounded("hot store", self.ctx.store.close())
        await _bounded("bus", self.ctx.bus.close())
        await _bounded("database", self.db.close())
        self.telemetry.stalls.stop()
        # flushes OTLP: never block the loop on it
        await _bounded("telemetry", asyncio.to_thread(self.telemetry.shutdown))
