"""The servers the benchmarks start, each in a process of its own.

    python bench/servers.py bare --listen 127.0.0.1:PORT
        a grpc.aio MeteringService that does no work: Authorize allows one slice at once;
        StreamUsage answers a start with one grant of SLICE_SECONDS, ignores
        usage reports and answers an end with a summary (what gRPC alone costs a live call)
    python bench/servers.py naive-redis --listen ... --redis-url URL --prefix P --agency A
        Authorize is one two-wallet Lua debit through redis-py (client and agency wallets,
        free micros first, all or nothing)
    python bench/servers.py plain-postgres --listen ... --database CONNINFO --agency A [--pool N]
        Authorize is one row-locking transaction through psycopg: SELECT ... FOR UPDATE on
        the client's wallet and the agency's, both updated free first, a ledger row each, commit
    python bench/servers.py creditd
        `creditd serve` itself, configured by CREDITD_* variables

The two peers are the designs a user would build instead of creditd (SPEC §8): each debits
one slice (SLICE_SECONDS at 1 credit a minute) from the caller's client wallet and from the
agency wallet, which `prepare_naive_redis` / `prepare_plain_postgres` fund beforehand.
Every client belongs to the agency named by --agency.

Flags for every kind: --uvloop runs the event loop on uvloop. --reuseport binds with
SO_REUSEPORT so that several processes share one port (the kernel spreads connections over
them): creditd.app sets "grpc.so_reuseport" to 0 in server_options, which this wrapper
changes to 1 (bench only).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

PEERS = ("bare", "naive-redis", "plain-postgres")
SLICE_SECONDS = 60
SLICE_MICROS = 1_000_000  # one slice of 60 s at 1 credit (10^6 micros) a minute, on each wallet

# KEYS: the client's wallet, the agency's wallet (hashes of free and purchased micros).
# ARGV: what each pays. Returns 0 when both paid, else the number of the wallet that cannot.
DEBIT_LUA = """
local debits = {}
for i = 1, 2 do
  local wallet = redis.call('HMGET', KEYS[i], 'free', 'purchased')
  local free, purchased, cost = tonumber(wallet[1]), tonumber(wallet[2]), tonumber(ARGV[i])
  if not free or free + purchased < cost then return i end
  local from_free = math.min(free, cost)
  debits[i] = {from_free, cost - from_free}
end
for i = 1, 2 do  -- as integers: Lua would write -0 or 1e+15
  redis.call('HINCRBY', KEYS[i], 'free', string.format('%d', -debits[i][1]))
  redis.call('HINCRBY', KEYS[i], 'purchased', string.format('%d', -debits[i][2]))
end
return 0
"""

POSTGRES_SCHEMA = Path(__file__).with_name("plain_postgres.sql")


def _wallet_key(prefix: str, account_id: str) -> str:
    return f"{prefix}wallet:{account_id}"


def prepare_naive_redis(redis_url: str, prefix: str, agency: str, clients: list[str], funds: int) -> None:
    """Wallets for the naive-Redis servicer: each holds `funds` purchased micros."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for account_id in [agency, *clients]:
                pipe.hset(_wallet_key(prefix, account_id), mapping={"free": 0, "purchased": funds})
            pipe.execute()
    finally:
        client.close()


def prepare_plain_postgres(conninfo: str, agency: str, clients: list[str], funds: int) -> None:
    """The plain-Postgres servicer's tables, in a database of its own, and its wallets."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(POSTGRES_SCHEMA.read_text())
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO wallets VALUES (%s, 0, %s)", [(account_id, funds) for account_id in [agency, *clients]]
            )
        conn.execute("VACUUM ANALYZE wallets")


def _split(free: int, purchased: int, cost: int) -> tuple[int, int] | None:
    """What a wallet pays of `cost` from its free and its purchased micros; None if it cannot."""
    if free + purchased < cost:
        return None
    from_free = min(free, cost)
    return from_free, cost - from_free


class _Bare:
    async def Authorize(self, request: Any, context: Any) -> Any:
        from creditd_client.v1 import metering_pb2

        return metering_pb2.AuthorizeResponse(allowed=True, granted_seconds=SLICE_SECONDS, max_seconds=SLICE_SECONDS)

    async def StreamUsage(self, requests: Any, context: Any) -> Any:
        from creditd_client.v1 import metering_pb2

        async for request in requests:
            kind = request.WhichOneof("msg")
            if kind == "start":
                yield metering_pb2.StreamUsageResponse(grant=metering_pb2.Grant(granted_seconds=SLICE_SECONDS))
            elif kind == "end":
                summary = metering_pb2.SessionSummary(billed_seconds=request.end.seconds_used)
                yield metering_pb2.StreamUsageResponse(summary=summary)
                return


class _NaiveRedis:
    def __init__(self, args: argparse.Namespace) -> None:
        import redis.asyncio as aioredis

        # Blocking, as creditd's own pool: redis-py's default raises at once when all
        # connections are busy.
        pool = aioredis.BlockingConnectionPool.from_url(args.redis_url, max_connections=256, timeout=2.0)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._debit = self._redis.register_script(DEBIT_LUA)
        self._prefix = args.prefix
        self._agency_key = _wallet_key(args.prefix, args.agency)

    async def close(self) -> None:
        await self._redis.aclose()

    async def Authorize(self, request: Any, context: Any) -> Any:
        from creditd_client.v1 import common_pb2, metering_pb2

        keys = [_wallet_key(self._prefix, request.client_id), self._agency_key]
        short = await self._debit(keys=keys, args=[SLICE_MICROS, SLICE_MICROS])
        if short:
            reason = (
                common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED
                if short == 1
                else common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
            )
            return metering_pb2.AuthorizeResponse(allowed=False, deny_reason=reason)
        return metering_pb2.AuthorizeResponse(allowed=True, granted_seconds=SLICE_SECONDS, max_seconds=SLICE_SECONDS)


class _PlainPostgres:
    LOCK = "SELECT free_micros, purchased_micros FROM wallets WHERE account_id = %s FOR UPDATE"
    DEBIT = (
        "UPDATE wallets SET free_micros = free_micros - %s, purchased_micros = purchased_micros - %s"
        " WHERE account_id = %s"
    )
    LEDGER = (
        "INSERT INTO ledger (account_id, session_id, amount_micros, free_micros, purchased_micros)"
        " VALUES (%s, %s, %s, %s, %s), (%s, %s, %s, %s, %s)"
    )

    def __init__(self, args: argparse.Namespace) -> None:
        self._conninfo = args.database
        self._size = args.pool
        self._agency = args.agency
        self._pool: asyncio.Queue[Any] = asyncio.Queue()

    async def open(self) -> None:
        import psycopg

        for _ in range(self._size):
            self._pool.put_nowait(await psycopg.AsyncConnection.connect(self._conninfo))

    async def close(self) -> None:
        while not self._pool.empty():
            await self._pool.get_nowait().close()

    async def Authorize(self, request: Any, context: Any) -> Any:
        from creditd_client.v1 import common_pb2, metering_pb2

        conn = await self._pool.get()
        try:
            async with conn.transaction():
                # the client's wallet, then the agency's: one lock order for every call
                client = await (await conn.execute(self.LOCK, (request.client_id,))).fetchone()
                agency = await (await conn.execute(self.LOCK, (self._agency,))).fetchone()
                client_pays = _split(client[0], client[1], SLICE_MICROS) if client else None
                agency_pays = _split(agency[0], agency[1], SLICE_MICROS) if agency else None
                if client_pays is None or agency_pays is None:
                    reason = (
                        common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED
                        if client_pays is None
                        else common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
                    )
                    return metering_pb2.AuthorizeResponse(allowed=False, deny_reason=reason)
                await conn.execute(self.DEBIT, (*client_pays, request.client_id))
                await conn.execute(self.DEBIT, (*agency_pays, self._agency))
                session = request.session_id
                client_row = (request.client_id, session, -SLICE_MICROS, -client_pays[0], -client_pays[1])
                agency_row = (self._agency, session, -SLICE_MICROS, -agency_pays[0], -agency_pays[1])
                await conn.execute(self.LEDGER, (*client_row, *agency_row))
        finally:
            self._pool.put_nowait(conn)
        return metering_pb2.AuthorizeResponse(allowed=True, granted_seconds=SLICE_SECONDS, max_seconds=SLICE_SECONDS)


async def _serve_peer(args: argparse.Namespace) -> None:
    import grpc
    from creditd_client.v1 import metering_pb2_grpc

    implementation: Any
    if args.kind == "naive-redis":
        implementation = _NaiveRedis(args)
    elif args.kind == "plain-postgres":
        implementation = _PlainPostgres(args)
        await implementation.open()
    else:
        implementation = _Bare()
    servicer = type("PeerMetering", (metering_pb2_grpc.MeteringServiceServicer,), {})()
    servicer.Authorize = implementation.Authorize
    if isinstance(implementation, _Bare):
        servicer.StreamUsage = implementation.StreamUsage
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(args.reuseport))])
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(args.listen)
    if not port:
        raise SystemExit(f"cannot listen on {args.listen}")
    await server.start()
    print(f"{args.kind} servicer listening on {args.listen.rsplit(':', 1)[0]}:{port}", flush=True)
    await server.wait_for_termination()


def _serve_creditd(reuseport: bool) -> None:
    from creditd.cli import main

    main(["serve", *(["--reuse-port", "true"] if reuseport else [])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=(*PEERS, "creditd"))
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--reuseport", action="store_true")
    parser.add_argument("--redis-url", help="naive-redis: the Redis holding the wallets")
    parser.add_argument("--prefix", default="", help="naive-redis: the wallets' key prefix")
    parser.add_argument("--database", help="plain-postgres: libpq conninfo of the wallets' database")
    parser.add_argument("--pool", type=int, default=16, help="plain-postgres: connections")
    parser.add_argument("--agency", default="bench", help="the agency of every client")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.kind == "creditd":
        _serve_creditd(args.reuseport)
    else:
        asyncio.run(_serve_peer(args))


if __name__ == "__main__":
    main()
