"""TLS (CREDITD_TLS_CERT, CREDITD_TLS_KEY) and mutual TLS (CREDITD_TLS_CLIENT_CA)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from creditd_client.v1 import account_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ADMIN_TOKEN, Api, ServerFactory
from tests.security.certs import Authority, Pair

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


async def _answers(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """OK when an authenticated call goes through the channel, else the status it got."""
    api = Api(channel, ADMIN_TOKEN)
    try:
        await api.accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id="nobody"), metadata=api.metadata, timeout=3
        )
    except grpc.aio.AioRpcError as error:
        return grpc.StatusCode.OK if error.code() is grpc.StatusCode.NOT_FOUND else error.code()
    raise AssertionError("an unknown account was found")


def _secure(address: str, root: bytes, client: Pair | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    # Separate connections per channel: a shared one would hide a failed handshake.
    return grpc.aio.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)])


async def test_tls_works_with_the_ca_as_root_and_refuses_plaintext_and_other_cas(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    ca, stranger = Authority("creditd test CA"), Authority("another CA")
    cert, key = ca.issue("creditd", server=True).write(tmp_path, "server")
    async with make_server(tls_cert=cert, tls_key=key) as running:
        address = running.app.address
        async with _secure(address, ca.pem) as channel:
            assert await _answers(channel) is grpc.StatusCode.OK
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # TLS protects the key on the wire; it does not replace it.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await Api(channel, "").accounts.GetAccount(account_pb2.GetAccountRequest(account_id="x"), timeout=3)
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as plain:
            assert await _answers(plain) is grpc.StatusCode.UNAVAILABLE
        async with _secure(address, stranger.pem) as untrusted:
            assert await _answers(untrusted) is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    ca, stranger = Authority("creditd test CA"), Authority("another CA")
    cert, key = ca.issue("creditd", server=True).write(tmp_path, "server")
    client_ca = ca.write(tmp_path, "clients-ca")
    async with make_server(tls_cert=cert, tls_key=key, tls_client_ca=client_ca) as running:
        address = running.app.address
        async with _secure(address, ca.pem) as anonymous:
            assert await _answers(anonymous) is grpc.StatusCode.UNAVAILABLE
        async with _secure(address, ca.pem, ca.issue("voice-worker", server=False)) as known:
            assert await _answers(known) is grpc.StatusCode.OK
        async with _secure(address, ca.pem, stranger.issue("intruder", server=False)) as unknown:
            assert await _answers(unknown) is grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as plain:
            assert await _answers(plain) is grpc.StatusCode.UNAVAILABLE
        assert running.app.server is not None  # still serving after the refused handshakes
        async with _secure(address, ca.pem, ca.issue("voice-worker-2", server=False)) as again:
            assert await _answers(again) is grpc.StatusCode.OK
