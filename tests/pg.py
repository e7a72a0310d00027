"""A real PostgreSQL server for tests: Debian's PostgreSQL binaries, a private data directory, a free port on
127.0.0.1, run as the `postgres` user (the server refuses root), stopped by its own `pg_ctl`."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from gcs import free_port

USER, PASSWORD, DATABASE = "tuner", "s3cret-pw", "studies"


def binaries() -> Path | None:
    """Where PostgreSQL's server binaries are (`pg_config --bindir`), or None when there is no server to run."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
    return bindir if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists() else None


def can_run() -> str | None:
    """Why no server can be had here, or None when one can."""
    if binaries() is None:
        return "PostgreSQL's server binaries (Debian postgresql-15; `.ci/run` installs them) are not installed"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no `postgres` user to run the server as"
    if os.geteuid() != 0:
        return "starting the server as the `postgres` user needs root"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (the postgres extra) is not installed"
    return None


class PostgreSQL:
    """A running server with a database `studies` owned by a password user `tuner`."""

    def __init__(self, root: Path) -> None:
        self.bin = binaries()
        assert self.bin is not None
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        os.chmod(root, 0o755)
        for parent in root.parents:  # the postgres user must reach the data directory
            if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
        self.data.mkdir()
        shutil.chown(self.data, "postgres")
        shutil.chown(root, "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        with open(self.data / "pg_hba.conf", "w") as f:  # passwords over TCP, as a managed server asks
            f.write(
                "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
            )
        self.start()
        self.sql(f"CREATE USER {USER} PASSWORD '{PASSWORD}'")
        self.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    def _as_postgres(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        )

    def url(self, database: str = DATABASE, password: str = PASSWORD) -> str:
        return f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str) -> str:
        return self._as_postgres(
            "psql", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-tA", "-c", statement
        ).stdout

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._as_postgres("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash as a failover sees it: no shutdown checkpoint, every connection cut."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
