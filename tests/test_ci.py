"""What CI runs: lint, formatting and strict types on both packages, then the README's test
command, so that a contributor who runs the README's command runs what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Run the whole test suite") :]
    match = re.search(r"```sh\n(.+?)\n```", section, re.DOTALL)
    assert match, "the README shows no test command"
    return match.group(1).strip()


def test_ci_lints_type_checks_and_runs_the_readme_test_command() -> None:
    lines = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "set -euo pipefail" in lines  # a failing step fails the run
    for check in ("ruff check .", "ruff format --check .", "mypy", "(cd clients/python && mypy)"):
        assert check in lines, check
    assert lines[-1] == _readme_test_command() == "pip install -e '.[test]' -e clients/python && python -m pytest"
