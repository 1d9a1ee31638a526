"""Migrations are history: applied in order to an empty database, they give the schema the code describes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ting.store.db import Database, metadata, schema_migrations
from ting.store.migrations import MIGRATIONS


def describe(sync: sa.Connection | sa.MetaData) -> dict[str, Any]:
    """Tables, columns (type family, nullability, primary key), indexes and unique constraints, comparably."""
    if isinstance(sync, sa.MetaData):
        tables = {t.name: t for t in sync.sorted_tables}
        return {
            name: {
                "columns": {c.name: (_family(c.type), bool(c.nullable), c.primary_key) for c in t.columns},
                "indexes": sorted(tuple(c.name for c in i.columns) for i in t.indexes),
                "unique": sorted(
                    {tuple(c.name for c in u.columns) for u in t.constraints if isinstance(u, sa.UniqueConstraint)}
                    | {(c.name,) for c in t.columns if c.unique}
                ),
            }
            for name, t in tables.items()
        }
    inspector = sa.inspect(sync)
    out: dict[str, Any] = {}
    for name in inspector.get_table_names():
        pk = set(inspector.get_pk_constraint(name)["constrained_columns"])
        indexes = inspector.get_indexes(name)
        unique = [tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)]
        unique += [tuple(i["column_names"]) for i in indexes if i.get("unique")]
        out[name] = {
            "columns": {
                c["name"]: (_family(c["type"]), bool(c["nullable"]) and c["name"] not in pk, c["name"] in pk)
                for c in inspector.get_columns(name)
            },
            "indexes": sorted(tuple(i["column_names"]) for i in indexes if not i.get("unique")),
            "unique": sorted(set(unique)),
        }
    return out


def _family(kind: Any) -> str:
    """The kind of a column type, as both databases report it back (VARCHAR(40) and String(40) alike)."""
    families: tuple[tuple[str, tuple[type[Any], ...]], ...] = (
        ("integer", (sa.Integer,)),
        ("float", (sa.Float,)),
        ("text", (sa.String, sa.Text)),
        ("binary", (sa.LargeBinary,)),  # BLOB on SQLite, BYTEA on PostgreSQL
    )
    for family, types in families:
        if isinstance(kind, types):
            return family + (f"({kind.length})" if isinstance(kind, sa.String) and kind.length else "")
    return type(kind).__name__


async def test_applying_every_migration_gives_the_schema_the_code_expects(database_url: str) -> None:
    db = Database(database_url)
    try:
        applied = await db.migrate()
        assert applied == [name for _, name, _ in MIGRATIONS]
        assert await db.migrate() == []  # each is applied once
        actual = await db.query(describe)
        versions = [r.version for r in await db.read(sa.select(schema_migrations.c.version))]
        assert versions == [v for v, _, _ in MIGRATIONS]
        expected = describe(metadata)
        # primary keys are never null, whatever a column says
        for table in expected.values():
            table["columns"] = {k: (f, n and not pk, pk) for k, (f, n, pk) in table["columns"].items()}
        assert actual == expected
    finally:
        await db.close()
