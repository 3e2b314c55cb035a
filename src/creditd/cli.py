"""The `creditd` command: serve, migrate, reconcile, rebuild."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import typing
from collections.abc import Callable, Sequence

from creditd import __version__, gc_tuning, logs, workers
from creditd.app import App, migrate
from creditd.config import InvalidSettings, Settings, default_text, flag, from_env, variable
from creditd.maintenance import run_rebuild, run_reconcile
from creditd.startup import embedded_database_lock, explain, preflight, shown

# The settings each command takes as flags (serve: all of them).
LOGGING = ("log_level", "log_format")
MIGRATE_SETTINGS = ("database_url", *LOGGING)
OFFLINE_SETTINGS = ("database_url", "redis_url", "redis_prefix", *LOGGING)


def _metavar(name: str) -> str:
    annotation = Settings.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(typing.get_args(annotation)) + "}"
    if annotation is bool:
        return "{true,false}"
    if annotation is int:
        return "N"
    if annotation is float:
        return "SECONDS"
    if name.endswith("_url"):
        return "URL"
    if name.endswith("listen"):
        return "HOST:PORT"
    return "FILE" if name.startswith("tls_") else name.rpartition("_")[2].upper()


def add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """One flag per setting, its help made from the setting's field."""
    group = parser.add_argument_group("settings (a flag overrides its environment variable)")
    for name in names:
        field = Settings.model_fields[name]
        default = default_text(name)
        text = f"{field.description} [{variable(name)}" + (f"; default {default}]" if default else "]")
        group.add_argument(flag(name), dest=name, metavar=_metavar(name), help=text.replace("%", "%%"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditd", description="Credit authorization and metering sidecar.")
    parser.add_argument("--version", action="version", version=f"creditd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server", description="Run the gRPC server.")
    add_setting_flags(serve, tuple(Settings.model_fields))
    migrate_cmd = commands.add_parser("migrate", help="create or upgrade the database schema")
    add_setting_flags(migrate_cmd, MIGRATE_SETTINGS)
    for name, text in (
        ("reconcile", "compare Redis with the ledger for every account; exit 1 on any difference"),
        ("rebuild", "load Redis from the database (stop the replicas first)"),
    ):
        add_setting_flags(commands.add_parser(name, help=text), OFFLINE_SETTINGS)
    return parser


log = logging.getLogger("creditd.cli")


async def _serve(settings: Settings) -> None:
    app = App(settings)
    await app.start()
    gc_tuning.tune()
    store = f"redis ({shown(settings.redis_url)})" if settings.redis_url else "embedded"
    print(f"creditd {__version__} listening on {app.address}", flush=True)
    print(f"database: {shown(settings.database_url)}; hot store: {store}", flush=True)
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


def _run_serve(settings: Settings) -> int:
    with embedded_database_lock(settings):
        preflight(settings)
        asyncio.run(_serve(settings))
    return 0


def _run_migrate(settings: Settings) -> int:
    asyncio.run(migrate(settings.database_url))
    print(f"database schema is up to date: {shown(settings.database_url)}")
    return 0


COMMANDS: dict[str, Callable[[Settings], int]] = {
    "serve": _run_serve,
    "migrate": _run_migrate,
    "reconcile": lambda settings: asyncio.run(run_reconcile(settings)),
    "rebuild": lambda settings: asyncio.run(run_rebuild(settings)),
}


def _fail(message: str, code: int) -> typing.NoReturn:
    for line in message.splitlines():
        print(f"creditd: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    try:
        settings = from_env(**flags)
    except InvalidSettings as exc:
        _fail(str(exc), 2)
    logs.setup(settings.log_level, settings.log_format)
    try:
        if args.command == "serve" and settings.workers > 1:
            preflight(settings)
            # The same command line for each worker, made one process (the last flag wins).
            code = workers.run(settings, [*(sys.argv[1:] if argv is None else argv), "--workers", "1"])
        else:
            code = COMMANDS[args.command](settings)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        log.debug("creditd %s failed", args.command, exc_info=True)
        _fail(explain(exc, settings), 1)
    sys.exit(code)


if __name__ == "__main__":
    main()
