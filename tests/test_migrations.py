"""Alembic migrations on SQLite and PostgreSQL: base → first revision → … → head, with data.

Each step is applied on its own, so every revision's upgrade runs against the schema the one
before it left; a row stored at the first revision must survive to head, and the schema at head
must be exactly what the models declare (alembic's ``compare_metadata`` finds no difference).
The PostgreSQL case runs in a database of its own and skips with the reason when PostgreSQL is
not running on 127.0.0.1:5432.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, Table, func, select, types

from b24sms import schema
from b24sms.db import Database
from b24sms.models import Base
from tests.deployment import reset_schema


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.deployment)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path}/migrations.sqlite3")
    else:
        url = request.getfixturevalue("postgres_url")
        reset_schema(url)
        db = Database(url)
    try:
        yield db
    finally:
        db.dispose()


def revisions_in_order(db: Database) -> list[str]:
    """Every revision from the first to head."""
    script = ScriptDirectory.from_config(schema.alembic_config(db))
    return [rev.revision for rev in reversed(list(script.walk_revisions("base", "heads")))]


def schema_differences(db: Database) -> list[Any]:
    """What autogenerate would write to bring the database to the models: [] when equal."""
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def _sample(column: Any) -> Any:
    """A value for a NOT NULL column without a default, by its reflected type."""
    kind = column.type
    if isinstance(kind, types.Boolean):
        return False
    if isinstance(kind, types.Integer):
        return 1
    if isinstance(kind, types.Float | types.Numeric):
        return 1.0
    if isinstance(kind, types.DateTime):
        return dt.datetime(2026, 1, 1)
    if isinstance(kind, types.JSON):
        return {}
    length = getattr(kind, "length", None) or 32
    return "x" * min(length, 32)


def insert_portal(db: Database) -> None:
    """A row in ``portals`` as the current revision's columns allow (reflected, not modelled)."""
    with db.engine.begin() as conn:
        table = Table("portals", MetaData(), autoload_with=conn)
        values = {
            column.name: _sample(column)
            for column in table.columns
            if not column.nullable and column.server_default is None and not column.primary_key
        }
        values["member_id"] = "migrated-member"
        conn.execute(table.insert().values(**values))


def test_upgrade_from_the_first_revision_to_head(database: Database) -> None:
    revisions = revisions_in_order(database)
    assert revisions, "no migrations found"
    assert schema.current_revision(database) is None
    schema.upgrade(database, revisions[0])
    assert schema.current_revision(database) == revisions[0]
    insert_portal(database)
    for revision in revisions[1:]:
        schema.upgrade(database, revision)
        assert schema.current_revision(database) == revision
    schema.upgrade(database)  # head, and idempotent when already there
    assert schema.current_revision(database) == revisions[-1]
    assert schema_differences(database) == []
    with database.engine.connect() as conn:
        portals = Table("portals", MetaData(), autoload_with=conn)
        assert conn.execute(select(portals.c.member_id)).scalars().all() == ["migrated-member"]
        assert conn.execute(select(func.count()).select_from(portals)).scalar() == 1


def test_upgrade_twice_changes_nothing(database: Database) -> None:
    schema.upgrade(database)
    head = schema.current_revision(database)
    schema.upgrade(database)
    assert schema.current_revision(database) == head
    assert schema_differences(database) == []
