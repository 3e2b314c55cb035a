"""A real creditd server on 127.0.0.1:0 in the test process, and a client for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from creditd.app import App
from creditd.config import Settings
from creditd.domain.money import MICROS_PER_CREDIT
from creditd.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    metering_pb2_grpc,
)

ADMIN_TOKEN = "cdk_admin_0123456789abcdef"
CREDIT = MICROS_PER_CREDIT


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

    async def balance(self, account_id: str) -> ledger_pb2.GetBalanceResponse:
        return await self.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id=account_id), metadata=self.metadata)


@dataclass
class Running:
    app: App
    api: Api


ServerFactory = Callable[..., contextlib.AbstractAsyncContextManager[Running]]


@pytest.fixture
def make_server(tmp_path: Path) -> ServerFactory:
    """Start a server with settings overridden by keyword; several may run in one test."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Running]:
        values: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'creditd.db'}",
            "admin_token": ADMIN_TOKEN,
            "flush_interval_seconds": 0.05,
        }
        values.update(overrides)
        app = App(Settings(**values))
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
