"""The CI PostgreSQL (127.0.0.1:5432, trust auth, database ``test``) and whether it is up."""

from __future__ import annotations

from sqlalchemy import create_engine, text

POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def unreachable_reason(url: str = POSTGRES_URL) -> str | None:
    """None when ``url`` answers a query, else why not (for pytest.skip)."""
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return f"PostgreSQL not reachable at {url}: {type(exc).__name__}"
