"""bench/authorize.py works: one short run against both servers (not a benchmark)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "authorize.py"


def test_the_authorize_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--duration", "1", "--warmup", "0.3", "--concurrency", "8", "--channels", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    row = re.compile(r"^(bare|creditd)\s+asyncio\s+1\s+8\s+2\s+(\d+)\s+(\d+)", re.M)
    rows = {m.group(1): m.groups()[1:] for m in row.finditer(done.stdout)}
    assert set(rows) == {"bare", "creditd"}, output
    assert all(int(calls) > 0 for calls, _ in rows.values()), output
    assert re.search(r"^ratio creditd/bare \(asyncio x1\): \d+\.\d\d", done.stdout, re.M), output
    # every creditd Authorize was a real, allowed session: no errors, no denials
    creditd_line = next(line for line in done.stdout.splitlines() if line.startswith("creditd "))
    errors, denied = creditd_line.split()[11:13]
    assert (errors, denied) == ("0", "0"), creditd_line
