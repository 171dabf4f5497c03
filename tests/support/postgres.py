"""A throw-away PostgreSQL server for tests and benchmarks (Debian's postgresql-15 binaries, no Docker).

`PostgresServer` runs initdb/pg_ctl on a temporary data directory, listening on 127.0.0.1 only (free
port) with its unix socket inside the temporary directory, `fsync=off` for speed. PostgreSQL refuses to
run as root, so under root the binaries run as an unprivileged system user (`nobody`, or `chatpipe-test`
created on demand) that owns the temporary directory.

As a pytest plugin (`pytest_plugins = ["tests.support.postgres"]`, or `-p tests.support.postgres`) it
provides the session fixtures `postgres_server` and `postgres_url`; both skip, with the reason, only when
no PostgreSQL binaries exist on this machine.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SEARCH_DIRS = ("/usr/lib/postgresql/15/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
FALLBACK_USER = "chatpipe-test"
SUPERUSER = "postgres"
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries on this machine (the one reason to skip)."""


def find_bindir() -> str:
    """Directory holding both `initdb` and `pg_ctl`: PATH first, then Debian's versioned directories."""
    initdb = shutil.which("initdb")
    if initdb:
        real = os.path.dirname(os.path.realpath(initdb))
        if os.access(os.path.join(real, "pg_ctl"), os.X_OK):
            return real
    for d in SEARCH_DIRS:
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin;"
        " install postgresql-15"
    )


def _unprivileged_user() -> pwd.struct_passwd:
    for name in (FALLBACK_USER, "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        check=True,
    )
    return pwd.getpwnam(FALLBACK_USER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One private cluster. `start()` (initdb on first start), `stop()`, `restart()`, `cleanup()`.

    `settings` override entries of `SETTINGS` (postgresql.conf values as written there), e.g.
    `{"fsync": "on", "synchronous_commit": "on"}` for a durable server.
    """

    def __init__(
        self,
        bindir: str | None = None,
        database: str = "chatpipe_test",
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bindir = bindir or find_bindir()
        self.database = database
        self.settings = {**SETTINGS, **(settings or {})}
        self.root = Path(tempfile.mkdtemp(prefix="chatpipe-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self.port = _free_port()
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = _unprivileged_user()
            self._run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.sockets.mkdir()
        if self._run_as:
            os.chown(self.sockets, self._run_as["user"], self._run_as["group"])
        self._initialised = False
        self.running = False

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [os.path.join(self.bindir, tool), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            check=check,
            **self._run_as,
        )

    def _initdb(self) -> None:
        self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# chatpipe tests\n")
            for key, value in {
                **self.settings,
                "port": str(self.port),
                "unix_socket_directories": f"'{self.sockets}'",
            }.items():
                conf.write(f"{key} = {value}\n")
        self._initialised = True

    def start(self) -> None:
        if self.running:
            return
        if not self._initialised:
            self._initdb()
        done = self._pg(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start", check=False
        )
        if done.returncode != 0:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{log[-4000:]}")
        self.running = True
        if self.database:
            self.create_database(self.database, exist_ok=True)

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)
            self.running = False

    def restart(self) -> None:
        """Stop then start the same cluster (same data, same port)."""
        self.stop()
        self.start()

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """Create database `name` (a plain identifier) and return its URL."""
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{name}"')
            elif not exist_ok:
                raise ValueError(f"database {name!r} exists")
        return self.url_for(name)

    def cleanup(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


_counter = iter(range(1, 1_000_000))


def fresh_database(server: PostgresServer, prefix: str = "t") -> str:
    """A new empty database on `server` (unique name); returns its URL."""
    return server.create_database(f"{prefix}_{os.getpid()}_{int(time.time())}_{next(_counter)}")


def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new empty store of the dialect a `params=["sqlite", "postgresql"]` fixture names: a
    SQLite file in `tmp_path`, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chatpipe.db'}"
    return fresh_database(request.getfixturevalue("postgres_server"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        bindir = find_bindir()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    with PostgresServer(bindir) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url
