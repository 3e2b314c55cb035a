"""The `creditd` command: serve, migrate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from sqlalchemy.engine import make_url

from creditd import __version__, logs
from creditd.app import App, migrate
from creditd.config import Settings, from_env
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


log = logging.getLogger("creditd.cli")


def _settings(**overrides: object) -> Settings:
    try:
        return from_env(None, **overrides)
    except ValueError as exc:
        raise SystemExit(f"creditd: {exc}") from None


def _without_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable URL)"


async def _serve(settings: Settings) -> None:
    app = App(settings)
    await app.start()
    store = f"redis ({_without_password(settings.redis_url)})" if settings.redis_url else "embedded"
    print(f"creditd {__version__} listening on {app.address}", flush=True)
    print(f"database: {_without_password(settings.database_url)}; hot store: {store}", flush=True)
    if app.metrics_address:
        print(f"metrics: http://{app.metrics_address}/metrics", flush=True)
    if settings.admin_token:
        print("authenticate with 'authorization: Bearer <CREDITD_ADMIN_TOKEN>'", flush=True)
    else:
        print(f"admin key for this run (set CREDITD_ADMIN_TOKEN to choose one): {app.admin_token}", flush=True)
        print(f"  e.g. export CREDITD_TOKEN={app.admin_token}", flush=True)
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    await signals.get()
    # Readiness goes NOT_SERVING at once; live calls may end by themselves until the drain
    # deadline, then they are cut and settled. A second signal cuts them at once.
    print(f"creditd draining: live calls have {settings.drain_seconds:g}s to end", flush=True)
    log.warning("draining: no new sessions; live calls have %gs to end", settings.drain_seconds)
    drain = asyncio.create_task(app.drain())
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: cutting live calls now")
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await app.drain(0)
    second.cancel()
    await app.stop()
    print("creditd stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        settings = _settings(
            listen=args.listen,
            database_url=args.database_url,
            redis_url=args.redis_url,
            slice_seconds=args.slice_seconds,
        )
        logs.setup(settings.log_level, settings.log_format)
        asyncio.run(_serve(settings))
    elif args.command == "migrate":
        settings = _settings(database_url=args.database_url)
        logs.setup(settings.log_level, settings.log_format)
        asyncio.run(migrate(settings.database_url))
        print(f"database schema is up to date: {_without_password(settings.database_url)}")
    elif args.command in ("reconcile", "rebuild"):
        settings = _settings(database_url=args.database_url, redis_url=args.redis_url)
        logs.setup(settings.log_level, settings.log_format)
        command = run_reconcile if args.command == "reconcile" else run_rebuild
        sys.exit(asyncio.run(command(settings)))
    else:  # pragma: no cover - argparse rejects it
        sys.exit(2)


if __name__ == "__main__":
    main()
