"""The `creditd` command: serve, migrate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from creditd import __version__
from creditd.app import App, migrate
from creditd.config import from_env
from creditd.maintenance import run_rebuild, run_reconcile


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditd", description="Credit authorization and metering sidecar.")
    parser.add_argument("--version", action="version", version=f"creditd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--listen", help="host:port (CREDITD_LISTEN, default 127.0.0.1:50051)")
    serve.add_argument("--database-url", help="SQLAlchemy URL (CREDITD_DATABASE_URL)")
    serve.add_argument("--redis-url", help="Redis URL (CREDITD_REDIS_URL); unset: embedded hot store")
    serve.add_argument("--slice-seconds", type=int, help="reservation slice (CREDITD_SLICE_SECONDS, default 60)")
    migrate_cmd = commands.add_parser("migrate", help="create or upgrade the database schema")
    migrate_cmd.add_argument("--database-url", help="SQLAlchemy URL (CREDITD_DATABASE_URL)")
    for name, text in (
        ("reconcile", "compare Redis with the ledger for every account; exit 1 on any difference"),
        ("rebuild", "load Redis from the database (stop the replicas first)"),
    ):
        offline = commands.add_parser(name, help=text)
        offline.add_argument("--database-url", help="SQLAlchemy URL (CREDITD_DATABASE_URL)")
        offline.add_argument("--redis-url", help="Redis URL (CREDITD_REDIS_URL)")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    settings = from_env(
        listen=args.listen,
        database_url=args.database_url,
        redis_url=args.redis_url,
        slice_seconds=args.slice_seconds,
    )
    app = App(settings)
    await app.start()
    store = f"redis ({settings.redis_url})" if settings.redis_url else "embedded"
    print(f"creditd {__version__} listening on {app.address}", flush=True)
    print(f"database: {settings.database_url}; hot store: {store}", flush=True)
    if settings.admin_token:
        print("authenticate with 'authorization: Bearer <CREDITD_ADMIN_TOKEN>'", flush=True)
    else:
        print(f"admin key for this run (set CREDITD_ADMIN_TOKEN to choose one): {app.admin_token}", flush=True)
        print(f"  e.g. export CREDITD_TOKEN={app.admin_token}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print(f"creditd draining: live calls have {settings.drain_seconds:g}s to end", flush=True)
    await app.drain()
    await app.stop()
    print("creditd stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "serve":
        asyncio.run(_serve(args))
    elif args.command == "migrate":
        settings = from_env(database_url=args.database_url)
        asyncio.run(migrate(settings.database_url))
        print(f"database schema is up to date: {settings.database_url}")
    elif args.command in ("reconcile", "rebuild"):
        settings = from_env(database_url=args.database_url, redis_url=args.redis_url)
        command = run_reconcile if args.command == "reconcile" else run_rebuild
        sys.exit(asyncio.run(command(settings)))
    else:  # pragma: no cover - argparse rejects it
        sys.exit(2)


if __name__ == "__main__":
    main()
