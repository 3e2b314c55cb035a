"""Five minutes with creditd: an agency, a plan, a client, a top-up and a call cut off on time.

Start a server first (`creditd serve`), then, with the client package installed
(`pip install ./clients/python`):

    export CREDITD_TOKEN=<the admin key it printed>
    export CREDITD_ADDRESS=127.0.0.1:50051   # where it listens (this is the default)
    python examples/walkthrough.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import grpc
from creditd_client.credits import format_credits
from creditd_client.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
)

CREDIT = 1_000_000


async def main(token: str) -> None:
    address = os.environ.get("CREDITD_ADDRESS", "127.0.0.1:50051")
    auth = (("authorization", f"Bearer {token}"),)
    run = uuid.uuid4().hex[:6]  # fresh ids, so the walkthrough can run again
    agency, client = f"acme-{run}", f"dental-{run}"

    async with grpc.aio.insecure_channel(address) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        metering = metering_pb2_grpc.MeteringServiceStub(channel)

        # 1. The platform creates an agency: it gets 300 free voice credits a month.
        await accounts.CreateAgency(
            account_pb2.CreateAgencyRequest(agency_id=agency, display_name="Acme Reception"), metadata=auth
        )
        # 2. The agency designs a plan: no free credits, 60 credits a minute (one a second).
        await accounts.CreatePlan(
            account_pb2.CreatePlanRequest(
                agency_id=agency,
                plan_id="per-second",
                default_voice_micros_per_minute=60 * CREDIT,
                default_sms_micros_per_segment=166_000,
            ),
            metadata=auth,
        )
        # 3. ...and signs up a client that pays through its own wallet.
        await accounts.CreateClient(
            account_pb2.CreateClientRequest(
                client_id=client, agency_id=agency, plan_id="per-second", billing_mode=common_pb2.BILLING_MODE_REBILLING
            ),
            metadata=auth,
        )
        # 4. The client buys 12 credits (a payment webhook would send its payment id as the key).
        topup = await ledger.Topup(
            ledger_pb2.TopupRequest(
                account_id=client,
                balance_type=common_pb2.BALANCE_TYPE_VOICE,
                amount_micros=12 * CREDIT,
                kind=ledger_pb2.TOPUP_KIND_PURCHASE,
                idempotency_key=f"payment-{run}",
            ),
            metadata=auth,
        )
        print(f"client {client}: {format_credits(topup.balance.available_micros)} credits available")

        # 5. A call comes in: the voice agent asks before answering.
        session = f"call-{run}"
        authorization = await metering.Authorize(
            metering_pb2.AuthorizeRequest(
                session_id=session,
                client_id=client,
                channel=common_pb2.CHANNEL_VOICE,
                direction=common_pb2.DIRECTION_INBOUND,
                provider="elevenlabs",
            ),
            metadata=auth,
        )
        print(
            f"authorize: allowed={authorization.allowed} granted={authorization.granted_seconds}s "
            f"affordable={authorization.max_seconds}s"
        )

        # 6. Answered: stream the call. The server cuts it when the 12 credits are spent.
        call = metering.StreamUsage(metadata=auth)
        await call.write(
            metering_pb2.StreamUsageRequest(
                start=metering_pb2.SessionStart(session_id=session, client_id=client, channel=common_pb2.CHANNEL_VOICE)
            )
        )
        answered = time.monotonic()
        async for message in call:
            elapsed = time.monotonic() - answered
            kind = message.WhichOneof("msg")
            if kind == "grant":
                print(f"{elapsed:5.1f}s grant: may talk until second {message.grant.granted_seconds}")
            elif kind == "warning":
                print(f"{elapsed:5.1f}s warning: {message.warning.remaining_seconds}s left, time to say goodbye")
            elif kind == "cutoff":
                reason = common_pb2.DenyReason.Name(message.cutoff.reason)
                print(f"{elapsed:5.1f}s cutoff: {reason}, billed {message.cutoff.billed_seconds}s")

        balance = await ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id=client), metadata=auth)
        print(
            f"client {client}: {format_credits(balance.voice.available_micros)} credits left, "
            f"{format_credits(balance.voice.period_used_micros)} used this period"
        )


if __name__ == "__main__":
    if not os.environ.get("CREDITD_TOKEN"):
        sys.exit(
            "walkthrough: set CREDITD_TOKEN to the admin key that `creditd serve` printed\n"
            "  (the line 'export CREDITD_TOKEN=cdk_bootstrap_...'), and CREDITD_ADDRESS if it does not\n"
            "  listen on 127.0.0.1:50051"
        )
    try:
        asyncio.run(main(os.environ["CREDITD_TOKEN"]))
    except grpc.aio.AioRpcError as error:
        sys.exit(f"walkthrough: {error.code().name}: {error.details()} (is creditd serve running there?)")
