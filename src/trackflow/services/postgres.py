"""A PostgreSQL cluster in a folder of the project, run with the system's server binaries.

PostgreSQL refuses to run as root: when trackflow runs as root, the cluster belongs to the
``postgres`` system user (Debian's package creates it) and every server command runs as that user
through ``runuser``; otherwise the cluster is the current user's. Connections go over TCP on
127.0.0.1 with a password (scram-sha-256); the Unix socket sits in the cluster's own folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from trackflow.errors import ConfigError

#: Where Debian's ``postgresql`` package puts the server binaries (one folder per major version).
DEBIAN_BINARIES = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"
#: The role that owns the databases; its password is the stack's database password.
ROLE = "trackflow"
INSTALL = "apt-get update && apt-get install -y postgresql"


@dataclass(frozen=True)
class Cluster:
    """A cluster's folder, port and password; ``bin`` holds ``initdb``, ``pg_ctl``, ``postgres``."""

    folder: Path
    port: int
    password: str
    bin: Path

    @property
    def data(self) -> Path:
        """The cluster's data folder (``initdb -D``)."""
        return self.folder / "data"

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.folder / "postgres.log"

    def url(self, database: str, driver: str = "psycopg", password: str | None = None) -> str:
        """A SQLAlchemy URL of one of its databases (``driver``: psycopg, asyncpg)."""
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql+{driver}://{ROLE}:{secret}@127.0.0.1:{self.port}/{database}"


def find_binaries(install: bool = True) -> Path:
    """The folder of the server binaries: on PATH, else Debian's newest; installed when missing.

    Installing runs ``apt-get`` (root only); otherwise the error says what to run.
    """
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    versions = sorted(
        DEBIAN_BINARIES.glob("*/bin/initdb"), key=lambda p: _version(p.parent.parent.name)
    )
    if versions:
        return versions[-1].parent
    if not install:
        raise ConfigError(f"PostgreSQL's server is not installed: run `{INSTALL}` (as root)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ConfigError(
            f"PostgreSQL's server is not installed and trackflow cannot install it here (it "
            f"needs root and apt-get): run `sudo sh -c '{INSTALL}'`, or put a PostgreSQL "
            "server's bin folder (initdb, pg_ctl) on PATH"
        )
    print("services: installing PostgreSQL with apt-get (once) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(["sh", "-c", INSTALL], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(
            f"installing PostgreSQL failed (`{INSTALL}`, exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}"
        )
    return find_binaries(install=False)


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _as_owner(argv: list[str]) -> list[str]:
    """``argv`` run as the cluster's owner: the ``postgres`` user when we are root."""
    return ["runuser", "-u", SYSTEM_USER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], what: str, timeout: float = 120) -> str:
    result = subprocess.run(_as_owner(argv), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise ConfigError(f"PostgreSQL: {what} failed (exit {result.returncode}): {output[-800:]}")
    return result.stdout


def ensure_cluster(cluster: Cluster) -> bool:
    """Create the cluster (``initdb``) unless its folder holds one; return whether it was made.

    As root the folder is handed to the ``postgres`` user, who must be able to reach it: a
    folder above it closed to other users is named in the error, with the fix.
    """
    if (cluster.data / "PG_VERSION").is_file():
        return False
    cluster.folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(cluster.folder, SYSTEM_USER, SYSTEM_USER)
        cluster.folder.chmod(0o700)
        _check_reachable(cluster.folder)
    # initdb reads the password from a file: never on a command line, where `ps` would show it.
    with tempfile.NamedTemporaryFile("w", dir=cluster.folder, delete=False) as handle:
        handle.write(cluster.password + "\n")
    secret = Path(handle.name)
    try:
        if os.geteuid() == 0:
            shutil.chown(secret, SYSTEM_USER, SYSTEM_USER)
        secret.chmod(0o600)
        _run(
            [str(cluster.bin / "initdb"), "-D", str(cluster.data), "-U", ROLE, "-E", "UTF8",
             "--auth=scram-sha-256", f"--pwfile={secret}", "--no-instructions"],
            "creating the cluster (initdb)",
        )  # fmt: skip
    finally:
        secret.unlink(missing_ok=True)
    return True


def _check_reachable(folder: Path) -> None:
    """Fail, naming the folder in the way, when the ``postgres`` user cannot enter ``folder``."""
    probe = subprocess.run(["runuser", "-u", SYSTEM_USER, "--", "test", "-w", str(folder)])
    if probe.returncode == 0:
        return
    closed = next(
        (p for p in reversed(folder.parents) if not os.stat(p).st_mode & 0o001), folder.parent
    )
    raise ConfigError(
        f"PostgreSQL runs as the '{SYSTEM_USER}' user, who cannot reach {folder}: {closed} is "
        f"closed to other users. Let them pass through it (`chmod o+x {closed}`: entering, not "
        "listing) or put the services elsewhere (--dir or TRACKFLOW_SERVICES_DIR)"
    )


def is_running(cluster: Cluster) -> bool:
    """Whether the cluster's server is up (``pg_ctl status``)."""
    if not (cluster.data / "PG_VERSION").is_file():
        return False
    status = subprocess.run(
        _as_owner([str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "status"]),
        capture_output=True,
    )
    return status.returncode == 0


def start(cluster: Cluster) -> None:
    """Start the server on 127.0.0.1:``port`` and wait until it accepts connections."""
    options = f"-h 127.0.0.1 -p {cluster.port} -k {cluster.folder}"
    _run(
        [str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "-l", str(cluster.log),
         "-o", options, "-w", "-t", "60", "start"],
        f"starting the server on port {cluster.port} (its log: {cluster.log})",
    )  # fmt: skip
    wait_until_ready(cluster)


def stop(cluster: Cluster) -> None:
    """Stop the server (fast shutdown: open sessions are ended, the data is kept)."""
    _run([str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "-m", "fast", "-w", "stop"],
         "stopping the server")  # fmt: skip


def wait_until_ready(cluster: Cluster, timeout: float = 60) -> None:
    """Wait until a client can log in (the server may still be recovering after a start)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(_dsn(cluster, "postgres"), connect_timeout=5):
                return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"PostgreSQL on 127.0.0.1:{cluster.port} does not accept connections "
                    f"after {timeout:.0f} s ({str(exc).strip().splitlines()[-1]}); "
                    f"its log: {cluster.log}"
                ) from None
            time.sleep(0.5)


def create_databases(cluster: Cluster, names: list[str]) -> list[str]:
    """Create the databases that do not exist yet; return those created."""
    import psycopg

    created = []
    with psycopg.connect(_dsn(cluster, "postgres"), autocommit=True) as connection:
        existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                connection.execute(f'CREATE DATABASE "{name}"')
                created.append(name)
    return created


def _dsn(cluster: Cluster, database: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host="127.0.0.1", port=cluster.port, dbname=database, user=ROLE, password=cluster.password
    )
