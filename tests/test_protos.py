"""The API contract: buf lint passes and the committed stubs are generated from the protos."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_buf_lint_passes() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stubs_are_in_step_with_the_protos() -> None:
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "scripts" / "genproto.py")
    assert spec is not None and spec.loader is not None
    genproto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(genproto)
    fresh = genproto.generate()
    committed = {
        p.name: p.read_text()
        for p in (ROOT / "clients" / "python" / "src" / "creditd_client" / "v1").iterdir()
        if p.is_file()
    }
    assert set(fresh) == set(committed)
    stale = [name for name, text in fresh.items() if committed[name] != text]
    assert not stale, f"run `python scripts/genproto.py`: {stale} differ from the protos"
