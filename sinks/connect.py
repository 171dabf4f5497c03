"""Open the store a URL names (`CHATPIPE_STORE_URL`): `sqlite:///path` or `postgresql://...`.

Above `sinks.store` (the contract both dialects implement) and the two dialects (`sinks.sqlite`,
`sinks.postgres`), so the contract imports neither and no cycle runs between them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from sinks.rows import PiiPolicy
from sinks.store import Store


def sqlite_path(url: str) -> str:
    """`sqlite:///rel/path.db` -> `rel/path.db`, `sqlite:////abs/path.db` -> `/abs/path.db`,
    `sqlite:///:memory:` -> `:memory:` (SQLAlchemy's convention)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"not a sqlite URL (expected sqlite:///path): {url!r}")
    return url[len(prefix) :]


def open_store(
    url: str, pii: PiiPolicy, *, synchronous_commit: bool = True, read_only: bool = False
) -> Store:
    """Open (not migrate) the store named by `url`: `sqlite:///path` or `postgresql://...`.

    `read_only=True` opens it for reads only: a SQLite file must exist (it is not created); a write raises
    (SQLite: PermissionError; PostgreSQL: every transaction is READ ONLY, so the database refuses it with
    `psycopg.errors.ReadOnlySqlTransaction`), never TransientError: retrying cannot help.

    `synchronous_commit=False` (PostgreSQL only, opt-in) commits without waiting for the WAL flush: a
    server crash may lose the last committed batches although their offsets are committed.
    Raises ValueError for an unsupported URL, TransientError when PostgreSQL cannot be reached.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from sinks.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url), pii, read_only=read_only)
    if scheme in ("postgresql", "postgres"):
        from sinks.postgres import PostgresStore

        return PostgresStore(url, pii, synchronous_commit=synchronous_commit, read_only=read_only)
    raise ValueError(f"unsupported store URL scheme {scheme!r}: use sqlite:///path or postgresql://...")
