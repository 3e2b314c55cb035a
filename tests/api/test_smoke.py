from __future__ import annotations

import pytest
from creditd_client.v1 import common_pb2, metering_pb2

from tests.conftest import ALL_BACKENDS, CREDIT, Api

# The rules hold on every backend, the Redis Cluster one included.
pytestmark = pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)


async def test_agency_gets_300_free_credits_and_client_sees_its_plan(api: Api) -> None:
    await api.agency("acme")
    await api.plan("acme", "basic", free_voice_micros=200 * CREDIT)
    await api.client("dental", "acme", "basic")
    agency = await api.balance("acme")
    client = await api.balance("dental")
    assert agency.voice.free_micros == 300 * CREDIT
    assert agency.sms.free_micros == 83 * CREDIT
    assert client.voice.free_micros == 200 * CREDIT
    response = await api.metering.Authorize(
        metering_pb2.AuthorizeRequest(
            session_id="call-1",
            client_id="dental",
            channel=common_pb2.CHANNEL_VOICE,
            direction=common_pb2.DIRECTION_INBOUND,
            provider="deepgram",
        ),
        metadata=api.metadata,
    )
    assert response.allowed
    assert response.granted_seconds == 60
    assert response.max_seconds == 12_000  # 200 client credits at 1 credit/min bind before the agency's 300
