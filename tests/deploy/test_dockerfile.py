"""The container image: its Dockerfile, the install it performs and its health check.

No Docker engine runs here, so the Dockerfile is parsed and what it runs is run directly:
`pip wheel --no-deps .` on a build context filtered by .dockerignore, and the health check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from concurrent import futures
from fnmatch import fnmatch
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
Instruction = tuple[str, str]


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions as (NAME, arguments), grouped by build stage; continuation lines are joined."""
    stages: list[list[Instruction]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        logical += stripped
        if logical.endswith("\\"):
            logical = logical[:-1].rstrip() + " "
            continue
        name, _, args = logical.partition(" ")
        if name.upper() == "FROM":
            stages.append([])
        stages[-1].append((name.upper(), args.strip()))
        logical = ""
    return stages


STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
BUILDER, RUNTIME = STAGES if len(STAGES) == 2 else ([], [])


def args_of(stage: list[Instruction], name: str) -> list[str]:
    return [args for instr, args in stage if instr == name]


def test_two_stages_on_python_311_slim() -> None:
    assert len(STAGES) == 2
    assert args_of(BUILDER, "FROM") == ["python:3.11-slim AS builder"]
    assert args_of(RUNTIME, "FROM") == ["python:3.11-slim AS runtime"]
    assert any("pip wheel --no-deps -w /wheels ./clients/python ." in run for run in args_of(BUILDER, "RUN"))
    assert any(c.startswith("--from=builder ") for c in args_of(RUNTIME, "COPY"))


def test_runtime_runs_as_uid_10001() -> None:
    assert args_of(RUNTIME, "USER") == ["10001:10001"]
    assert any("--uid 10001" in run for run in args_of(RUNTIME, "RUN"))
    # USER comes before the entry point, so nothing after it runs as root.
    names = [instr for instr, _ in RUNTIME]
    assert names.index("USER") < names.index("ENTRYPOINT")


def test_listens_on_all_interfaces_and_exposes_the_grpc_port() -> None:
    assert any("CREDITD_LISTEN=0.0.0.0:50051" in env for env in args_of(RUNTIME, "ENV"))
    assert args_of(RUNTIME, "EXPOSE") == ["50051"]


def test_entrypoint_is_the_creditd_console_script() -> None:
    assert [json.loads(a) for a in args_of(RUNTIME, "ENTRYPOINT")] == [["creditd"]]
    assert [json.loads(a) for a in args_of(RUNTIME, "CMD")] == [["serve"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["creditd"] == "creditd.cli:main"


def test_healthcheck_runs_the_grpc_health_module() -> None:
    (check,) = args_of(RUNTIME, "HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "--timeout=" in options
    assert json.loads(command) == ["python", "-m", "creditd.healthcheck"]


def _dockerignored(root: Path, patterns: list[str]) -> Callable[[str, list[str]], set[str]]:
    """A copytree ignore function that leaves out what .dockerignore keeps out of the build context."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel_dir = Path(directory).relative_to(root)
        skipped = set()
        for name in names:
            rel = (rel_dir / name).as_posix()
            for pattern in patterns:
                anywhere = pattern.removeprefix("**/")
                if fnmatch(rel, pattern) or (anywhere != pattern and fnmatch(name, anywhere)):
                    skipped.add(name)
        return skipped

    return ignore


def test_wheel_built_from_the_docker_context_installs_the_entry_point(tmp_path: Path) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    assert ".git" in patterns
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=_dockerignored(ROOT, patterns))
    assert not (context / ".git").exists() and not (context / "tests").exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheels"), "./clients/python", "."],
        cwd=context, check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("creditd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "creditd = creditd.cli:main" in zf.read(entry_points).decode()
    assert "creditd/healthcheck.py" in names
    (client_wheel,) = (tmp_path / "wheels").glob("creditd_client-*.whl")
    with zipfile.ZipFile(client_wheel) as zf:
        names = zf.namelist()
        assert "creditd_client/v1/metering_pb2.py" in names
        # the image has creditctl too: the builder installs every wheel it built into the venv
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "creditctl = creditd_client.cli:main" in zf.read(entry_points).decode()
    assert any("/opt/venv/bin/pip install /wheels/*.whl" in run for run in args_of(BUILDER, "RUN"))


def run_healthcheck(*args: str, listen: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("CREDITD_LISTEN", None)
    if listen is not None:
        env["CREDITD_LISTEN"] = listen
    return subprocess.run(
        [sys.executable, "-m", "creditd.healthcheck", *args],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_healthcheck_fails_quickly_when_nothing_listens() -> None:
    started = time.monotonic()
    result = run_healthcheck("127.0.0.1:1")
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 10
    assert "NOT SERVING" in result.stdout


@pytest.fixture(scope="module")
def health_server() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("creditd.v1.MeteringService", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield port
    server.stop(grace=None)


def test_healthcheck_exit_code_follows_the_health_service(health_server: int) -> None:
    address = f"127.0.0.1:{health_server}"
    assert run_healthcheck(address).returncode == 0
    assert run_healthcheck(address, "creditd.v1.MeteringService").returncode == 1
    assert run_healthcheck(address, "no.such.Service").returncode == 1
    # With no address it checks where CREDITD_LISTEN says creditd listens, via loopback.
    assert run_healthcheck(listen=f"0.0.0.0:{health_server}").returncode == 0
