"""The schema check a server makes at start, and the Alembic it loads only when needed."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from alembic.script import ScriptDirectory

from creditd.db.migrate import (
    HEAD_REVISION,
    alembic_config,
    current_revision,
    downgrade,
    schema_problem,
    sync_url,
    upgrade,
    upgrade_if_behind,
)


def test_the_head_revision_is_alembics_head(tmp_path):
    scripts = ScriptDirectory.from_config(alembic_config(f"sqlite:///{tmp_path / 'x.db'}"))
    assert scripts.get_current_head() == HEAD_REVISION


def test_the_schema_check_names_what_is_wrong(database_url):
    assert current_revision(database_url) is None
    assert schema_problem(database_url) == "holds no creditd schema: run `creditd migrate` first"
    upgrade(database_url)
    assert current_revision(database_url) == HEAD_REVISION
    assert schema_problem(database_url) == ""
    downgrade(database_url, "0002")
    assert schema_problem(database_url) == (
        f"has an older schema (0002, this release needs {HEAD_REVISION}): run `creditd migrate` first"
    )
    upgrade_if_behind(database_url)
    assert current_revision(database_url) == HEAD_REVISION
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    assert schema_problem(database_url) == (
        "was migrated by a newer creditd (schema 9999): run that release, or a newer one"
    )


def test_a_current_schema_is_checked_without_loading_alembic(database_url):
    upgrade(database_url)
    code = (
        "import sys\n"
        "from creditd.app import _migrate\n"
        "from creditd.startup import check_database\n"
        f"check_database({database_url!r})\n"
        f"_migrate({database_url!r})\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('alembic', 'mako', 'pygments')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
