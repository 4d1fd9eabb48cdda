"""Engines and schema upgrades.

``open_database(url)`` connects at once (so a bad URL fails before any client trains,
naming the URL with its password masked), brings the schema up to date and, for the
processes that record runs, proves that a write goes through (in a transaction it
rolls back), so a read-only database is refused before a SuperLink starts. Readers
(``runs``, ``report``, ``export``) pass ``create=False``: a mistyped SQLite path is
refused instead of becoming a new, empty database. Upgrades are ordered steps recorded
in ``schema_version``; each runs in its own transaction, so an existing database is
upgraded in place and never half-migrated.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from sqlalchemy import Connection, Engine, create_engine, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from server.db.models import (
    Base, CheckpointRecord, FederatedEvaluation, InitRecord, NodeEvaluation, RoundRecord, Run, SchemaVersion,
)


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


def _v3_run_uuid(conn: Connection) -> None:
    # Existing runs keep uuid NULL, and with it their checkpoint directory (run-<id>).
    columns = {c["name"] for c in inspect(conn).get_columns("runs")}
    if "uuid" not in columns:
        conn.execute(text("ALTER TABLE runs ADD COLUMN uuid VARCHAR(32)"))
    for index in Run.__table__.indexes:  # the same unique index a new database gets
        if index.columns.keys() == ["uuid"]:
            index.create(conn, checkfirst=True)


def _v4_central_epsilon(conn: Connection) -> None:
    # FLOAT is double precision on PostgreSQL and REAL on SQLite, as the model's Float
    if not inspect(conn).has_table(RoundRecord.__tablename__):
        RoundRecord.__table__.create(conn)  # the current table, column included
        return
    columns = {c["name"] for c in inspect(conn).get_columns("rounds")}
    if "central_epsilon" not in columns:
        conn.execute(text("ALTER TABLE rounds ADD COLUMN central_epsilon FLOAT"))


def _v5_initialisations(conn: Connection) -> None:
    InitRecord.__table__.create(conn, checkfirst=True)  # Fed-SB's LoRA-SB init, one row per run


def _v6_federated_evaluations(conn: Connection) -> None:
    for table in (NodeEvaluation.__table__, FederatedEvaluation.__table__):  # the nodes' own evaluations
        table.create(conn, checkfirst=True)


# (version, step). Append new steps; never edit a released one.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _v1_initial), (2, _v2_checkpoints), (3, _v3_run_uuid), (4, _v4_central_epsilon),
    (5, _v5_initialisations), (6, _v6_federated_evaluations),
]
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


def _sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL (plain path or ``file:`` URI); None for memory or other backends."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    database = url.database
    if str(url.query.get("uri", "")).lower() in ("true", "1") and database.startswith("file:"):
        database = unquote(urlparse(database).path)
        if url.query.get("mode") == "memory" or database in ("", ":memory:"):
            return None
    return Path(database).expanduser()


def open_database(url: str, *, create: bool = True, write: bool = True) -> Engine:
    """Connect and upgrade the schema.

    ``create``: a missing SQLite file (and its directory) is created, as a new run
    needs; readers pass False so a mistyped path is refused, naming it. ``write``: the
    caller will record, so a write is tried now and rolled back; readers pass False.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"invalid database URL {url!r}") from None
    path = _sqlite_file(parsed)
    if path is not None and not path.exists():
        if not create:
            raise DatabaseError(f"database {masked(url)} does not exist: no file {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        kwargs = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 5}
        engine = create_engine(url, **kwargs)
        upgrade(engine)
    except (SQLAlchemyError, ModuleNotFoundError) as exc:
        raise DatabaseError(f"cannot use database {masked(url)}: {_first_line(exc)}") from None
    if write:
        try:
            _probe_write(engine)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot write to database {masked(url)}: {_first_line(exc)}") from None
    return engine


def _probe_write(engine: Engine) -> None:
    # An up-to-date schema is only ever read while opening, so a read-only file (or a
    # role without INSERT) would pass and fail at the first round, after a SuperLink
    # has started. Version 0 is never a real version; the row is rolled back.
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            conn.execute(SchemaVersion.__table__.insert().values(version=0, applied_at=datetime.now(UTC)))
        finally:
            transaction.rollback()


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


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
