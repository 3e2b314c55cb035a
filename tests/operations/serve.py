"""A `creditd serve` process for operations tests: stdout read until it says where it
listens, stderr (the JSON logs) kept in a file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path


class Serve:
    def __init__(self, home: Path, **env: str) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITD_", "OTEL_"))}
        environ.update(HOME=str(home), PYTHONUNBUFFERED="1", CREDITD_LISTEN="127.0.0.1:0", **env)
        self.log_path = home / f"creditd-{len(list(home.glob('creditd-*.log')))}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "creditd.cli", "serve"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("  e.g. export") or "Bearer <CREDITD_ADMIN_TOKEN>" in line:
                break
        else:
            raise AssertionError("creditd serve exited: " + "".join(self.lines) + self.logs())
        match = re.search(r"listening on (\S+)", "".join(self.lines))
        assert match, self.lines
        self.address = match.group(1)

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        assert self.process.stdout is not None
        self.lines += self.process.stdout.readlines()
        self._log.close()
        return code

    def read_until(self, text: str) -> str:
        """Read stdout up to the line containing `text`."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"creditd serve exited before printing {text!r}: {''.join(self.lines)}")

    def stop(self) -> int:
        """SIGTERM, and a second one once it drains (signals sent together may merge into one)."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            self.read_until("creditd draining")
            if self.process.poll() is None:
                self.signal(signal.SIGTERM)
        return self.wait()
