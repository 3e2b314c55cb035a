"""A plain `pip install ./clients/python .` gives a working creditd and creditctl: stubs,
migrations and scripts are in the wheels."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_installed_wheels_import_the_stubs_and_migrate_a_fresh_database(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), "./clients/python", "."],
        cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    wheels = sorted(str(wheel) for wheel in tmp_path.glob("creditd*.whl"))
    assert len(wheels) == 2, wheels
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # The dependencies come from the environment running this test (a path in a .pth file:
    # its own .pth files, such as those of editable installs of creditd, are not run), and
    # creditd and creditd-client only from the wheels.
    where = subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"], text=True)
    site = Path(where.strip())
    paths = dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]))
    (site / "test-dependencies.pth").write_text("\n".join(paths) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", *wheels],
        check=True, timeout=300,
    )  # fmt: skip
    script = (
        "import creditd, creditd_client, creditd_client.v1.metering_pb2 as m, creditd_client.v1.account_pb2_grpc;"
        f"assert str(creditd.__file__).startswith({str(site)!r}), creditd.__file__;"
        f"assert str(creditd_client.__file__).startswith({str(site)!r}), creditd_client.__file__;"
        "assert m.DESCRIPTOR.services_by_name['MeteringService'];"
        "print(creditd.__version__)"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([str(python), "-c", script], cwd=outside, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == VERSION, result.stderr
    database = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    migrate = subprocess.run(
        [str(env_dir / "bin" / "creditd"), "migrate", "--database-url", database],
        cwd=outside, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert (tmp_path / "fresh.db").stat().st_size > 0
    creditctl = subprocess.run(
        [str(env_dir / "bin" / "creditctl"), "--version"], cwd=outside, capture_output=True, text=True, timeout=60
    )
    assert creditctl.returncode == 0 and creditctl.stdout.strip() == f"creditctl {VERSION}", creditctl.stderr
