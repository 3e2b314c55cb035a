"""A real creditd server on 127.0.0.1:0 in the test process, and a client for it."""

from __future__ import annotations

import base64
import contextlib
import importlib
import pkgutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import creditd_client.v1
import grpc
import pytest
from creditd_client.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
)
from google.protobuf import descriptor as pb_descriptor
from google.rpc import error_details_pb2, status_pb2

from creditd.app import App
from creditd.config import Settings
from creditd.domain.money import MICROS_PER_CREDIT
from creditd.engine.clock import Clock
from tests import services
from tests.redis_cluster import LocalRedisCluster, running_cluster

ADMIN_TOKEN = "cdk_admin_0123456789abcdef"
CREDIT = MICROS_PER_CREDIT
DEFAULT_MAX_METADATA_BYTES = 8192  # what a default gRPC client accepts in headers and trailers


def creditd_methods() -> dict[str, pb_descriptor.MethodDescriptor]:
    """Every RPC of the creditd.v1 services, by path, from the file descriptors of the stubs."""
    methods = {}
    for module in pkgutil.iter_modules(creditd_client.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        file = importlib.import_module(f"creditd_client.v1.{module.name}").DESCRIPTOR
        if file.package != "creditd.v1":
            continue
        for service in file.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = method
    return methods


def trailers_size(error: Any) -> int:
    """The size of an error's status and trailers as gRPC counts it against its metadata limit
    (each entry: name, value, 32), the status message counted percent-encoded at worst."""
    size = len("grpc-status") + 2 + 32
    size += len("grpc-message") + 3 * len((error.details() or "").encode()) + 32
    for key, value in error.trailing_metadata() or ():
        raw = base64.b64encode(value) if isinstance(value, bytes) else value.encode()
        size += len(key) + len(raw) + 32
    return size


@dataclass
class Api:
    """Stubs of the three services, authenticated with one key."""

    channel: grpc.aio.Channel
    token: str

    def __post_init__(self) -> None:
        self.metering = metering_pb2_grpc.MeteringServiceStub(self.channel)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self.channel)
        self.accounts = account_pb2_grpc.AccountServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {self.token}"),)

    def as_key(self, token: str) -> Api:
        return Api(self.channel, token)

    # Shortcuts for the setup most tests need.

    async def agency(self, agency_id: str, **fields: Any) -> account_pb2.Account:
        response = await self.accounts.CreateAgency(
            account_pb2.CreateAgencyRequest(agency_id=agency_id, **fields), metadata=self.metadata
        )
        return response.account

    async def plan(self, agency_id: str, plan_id: str, **fields: Any) -> account_pb2.Plan:
        fields.setdefault("default_voice_micros_per_minute", CREDIT)
        fields.setdefault("default_sms_micros_per_segment", 166_000)
        response = await self.accounts.CreatePlan(
            account_pb2.CreatePlanRequest(agency_id=agency_id, plan_id=plan_id, **fields),
            metadata=self.metadata,
        )
        return response.plan

    async def client(
        self, client_id: str, agency_id: str, plan_id: str, mode: int = common_pb2.BILLING_MODE_REBILLING
    ) -> account_pb2.Account:
        response = await self.accounts.CreateClient(
            account_pb2.CreateClientRequest(
                client_id=client_id, agency_id=agency_id, plan_id=plan_id, billing_mode=mode
            ),
            metadata=self.metadata,
        )
        return response.account

    async def topup(
        self,
        account_id: str,
        micros: int,
        key: str,
        balance_type: int = common_pb2.BALANCE_TYPE_VOICE,
        kind: int = ledger_pb2.TOPUP_KIND_PURCHASE,
    ) -> ledger_pb2.TopupResponse:
        return await self.ledger.Topup(
            ledger_pb2.TopupRequest(
                account_id=account_id,
                balance_type=balance_type,
                amount_micros=micros,
                kind=kind,
                idempotency_key=key,
            ),
            metadata=self.metadata,
        )

    async def authorize(
        self,
        session_id: str,
        client_id: str,
        direction: int = common_pb2.DIRECTION_INBOUND,
        provider: str = "",
    ) -> metering_pb2.AuthorizeResponse:
        return await self.metering.Authorize(
            metering_pb2.AuthorizeRequest(
                session_id=session_id,
                client_id=client_id,
                channel=common_pb2.CHANNEL_VOICE,
                direction=direction,
                provider=provider,
            ),
            metadata=self.metadata,
        )

    def stream(self) -> Any:
        return self.metering.StreamUsage(metadata=self.metadata)

    async def start_call(self, session_id: str, client_id: str) -> tuple[Any, metering_pb2.StreamUsageResponse]:
        """Open a voice stream for an authorized session; returns it and its first grant."""
        call = self.stream()
        await call.write(
            metering_pb2.StreamUsageRequest(
                start=metering_pb2.SessionStart(
                    session_id=session_id, client_id=client_id, channel=common_pb2.CHANNEL_VOICE
                )
            )
        )
        return call, await call.read()

    async def end_call(self, call: Any, seconds: int) -> metering_pb2.StreamUsageResponse:
        """End a call; returns its last message (the summary, or a cutoff that came first)."""
        await call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=seconds)))
        while True:
            message = await call.read()
            if message.WhichOneof("msg") in ("summary", "cutoff"):
                return message

    async def balance(self, account_id: str) -> ledger_pb2.GetBalanceResponse:
        return await self.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id=account_id), metadata=self.metadata)


@dataclass
class Running:
    app: App
    api: Api


ServerFactory = Callable[..., contextlib.AbstractAsyncContextManager[Running]]


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    name = services.migrated_template()
    yield name
    services.drop_database(name)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A Redis Cluster of 3 primaries and 3 replicas shared by the session's tests; a test
    that kills its nodes starts a cluster of its own."""
    with running_cluster() as cluster:
        yield cluster


# Backends a module may opt into with pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True).
ALL_BACKENDS = ["embedded", "redis+postgres", "redis-cluster+postgres"]


@pytest.fixture(params=["embedded", "redis+postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Where a test server keeps its state: SQLite and in-process, or Postgres and Redis
    (one Redis, or a Redis Cluster that the server detects by itself)."""
    if request.param == "embedded":
        yield {"database_url": f"sqlite+aiosqlite:///{tmp_path / 'creditd.db'}"}
        return
    template = request.getfixturevalue("postgres_template")
    if request.param == "redis-cluster+postgres":
        url = request.getfixturevalue("redis_cluster").url
        with services.redis_and_postgres(template, url, cluster=True) as settings:
            yield settings
        return
    with services.redis_and_postgres(template) as settings:
        yield settings


@pytest.fixture
def make_server(backend: dict[str, str]) -> ServerFactory:
    """Start a server with settings overridden by keyword; several may run in one test and
    share the backend's stores, as replicas do."""

    @contextlib.asynccontextmanager
    async def start(clock: Clock | None = None, **overrides: Any) -> AsyncIterator[Running]:
        values: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "admin_token": ADMIN_TOKEN,
            "flush_interval_seconds": 0.05,
            **backend,
        }
        values.update(overrides)
        app = App(Settings(**values), clock)
        await app.start()
        channel = grpc.aio.insecure_channel(app.address)
        try:
            yield Running(app, Api(channel, ADMIN_TOKEN))
        finally:
            await channel.close()
            await app.stop(grace=0)

    return start


@pytest.fixture
async def server(make_server: ServerFactory) -> AsyncIterator[Running]:
    async with make_server() as running:
        yield running


@pytest.fixture
def api(server: Running) -> Api:
    return server.api


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The one google.rpc.ErrorInfo every creditd error carries."""
    details = [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]
    assert details, "the error carries no google.rpc.Status"
    status = status_pb2.Status.FromString(details[0])
    assert status.code == error.code().value[0]
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1
    assert infos[0].domain == "creditd"
    return infos[0]
