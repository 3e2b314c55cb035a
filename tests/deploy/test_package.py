"""A plain `pip install .` gives a working creditd: stubs, migrations and scripts are in the wheel."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_imports_the_stubs_and_migrates_a_fresh_database(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("creditd-*.whl")
    env_dir = tmp_path / "venv"
    # The dependencies come from this interpreter; creditd itself only from the wheel.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    script = (
        "import creditd, creditd_client.v1.metering_pb2 as m, creditd_client.v1.account_pb2_grpc;"
        "from pathlib import Path;"
        "assert 'site-packages' in creditd.__file__, creditd.__file__;"
        "assert m.DESCRIPTOR.services_by_name['MeteringService'];"
        "print('ok')"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([str(python), "-c", script], cwd=outside, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    database = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    migrate = subprocess.run(
        [str(env_dir / "bin" / "creditd"), "migrate", "--database-url", database],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert (tmp_path / "fresh.db").stat().st_size > 0
