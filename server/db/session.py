"""Engines and schema upgrades.

``open_database(url)`` connects at once (so a bad URL fails before any client trains,
naming the URL with its password masked) and brings the schema up to date. Upgrades
are ordered steps recorded in ``schema_version``; each runs in its own transaction, so
an existing database is upgraded in place and never half-migrated.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from server.db.models import Base, CheckpointRecord, SchemaVersion


class DatabaseError(RuntimeError):
    """The database cannot be used; the message names the (masked) URL."""


def _v1_initial(conn: Connection) -> None:
    # create_all skips existing tables: on an empty database this creates the
    # current schema, so later steps must be idempotent (check before altering).
    Base.metadata.create_all(conn)


def _v2_checkpoints(conn: Connection) -> None:
    CheckpointRecord.__table__.create(conn, checkfirst=True)
    columns = {c["name"] for c in inspect(conn).get_columns("runs")}
    if "updated_at" not in columns:
        conn.execute(text("ALTER TABLE runs ADD COLUMN updated_at TIMESTAMP"))


# (version, step). Append new steps; never edit a released one.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [(1, _v1_initial), (2, _v2_checkpoints)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


@contextlib.contextmanager
def scratch_schema(url: str, *, prefix: str = "fedlora_scratch") -> Iterator[str]:
    """A new, empty PostgreSQL schema, yielded as a URL whose search_path points at it.

    For tests and benchmarks that must not touch the tables already in a database:
    everything written goes into the schema, which is dropped (with its rows) on exit.
    """
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
        finally:
            with admin.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '30s'"))  # never hang on a leftover connection
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def masked(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_database(url: str) -> Engine:
    """Connect, create the SQLite directory if needed, and upgrade the schema."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"invalid database URL {url!r}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        kwargs = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 5}
        engine = create_engine(url, **kwargs)
        upgrade(engine)
    except (SQLAlchemyError, ModuleNotFoundError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseError(f"cannot use database {masked(url)}: {reason}") from None
    return engine


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table(SchemaVersion.__tablename__):
        return 0
    return conn.execute(select(SchemaVersion.version).order_by(SchemaVersion.version.desc())).scalar() or 0


def upgrade(engine: Engine) -> int:
    with engine.begin() as conn:
        version = current_version(conn)
    for target, step in MIGRATIONS:
        if target <= version:
            continue
        with engine.begin() as conn:
            step(conn)
            conn.execute(
                SchemaVersion.__table__.insert().values(version=target, applied_at=datetime.now(UTC))
            )
        version = target
    return version
