"""The local services of a team set-up, started and stopped as one: ``trackflow services up|down``.

On 127.0.0.1, with everything under one git-ignored folder (``.services/`` by default):

- **PostgreSQL** (:mod:`trackflow.services.postgres`): databases ``mlflow``, ``mlflow_auth``,
  ``prefect`` and ``optuna`` (the sweeps' study storage);
- an **MLflow tracking server** on it, proxying artifacts into the folder (``--serve-artifacts``),
  behind MLflow's ``basic-auth`` app;
- a **Prefect server** on it, behind ``PREFECT_SERVER_API_AUTH_STRING``, with a ``process`` work
  pool and N workers running in the project folder.

Secrets (the database's and the admin's passwords) come from the environment or are generated
once into ``credentials.env`` (mode 600); they travel to servers by environment, never on a command
line, and are never printed: ``env.sh`` (mode 600) holds what a client exports.
Each process started is remembered by a pid file; ``down`` stops exactly those, and keeps the data.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trackflow.errors import ConfigError
from trackflow.services import postgres
from trackflow.services.postgres import Cluster
from trackflow.tuning.study import STORAGE_ENV as SWEEP_STORAGE_ENV

#: The folder of the services' state, relative to the project (``--dir`` or this variable).
DIR_ENV = "TRACKFLOW_SERVICES_DIR"
DEFAULT_DIR = ".services"
#: Secrets, read from the environment first, else from ``credentials.env``; made when missing.
DB_PASSWORD_ENV = "TRACKFLOW_SERVICES_DB_PASSWORD"
ADMIN_PASSWORD_ENV = "TRACKFLOW_SERVICES_ADMIN_PASSWORD"
SECRET_KEY_ENV = "TRACKFLOW_SERVICES_SECRET_KEY"  # signs MLflow's CSRF tokens
SECRETS = (DB_PASSWORD_ENV, ADMIN_PASSWORD_ENV, SECRET_KEY_ENV)
#: The user of MLflow's basic-auth admin account and of Prefect's auth string.
ADMIN_USER = "admin"
#: The work pool of prefect.yaml's deployments.
WORK_POOL = "trackflow"
DATABASES = ["mlflow", "mlflow_auth", "prefect", "optuna"]
#: Client variables whose values are secrets: shown masked, never printed.
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", SWEEP_STORAGE_ENV)
START_TIMEOUT_S = 180
#: Seconds MLflow's basic-auth remembers a checked password (``auth_cache_ttl_seconds``).
AUTH_CACHE_S = 60
#: Prefect's command line, run by this environment's Python.
PREFECT = [sys.executable, "-m", "prefect"]


@dataclass(frozen=True)
class Settings:
    """Ports, workers and whether the servers ask for credentials; kept in ``stack.json``."""

    postgres_port: int = 54329
    mlflow_port: int = 5000
    prefect_port: int = 4200
    workers: int = 2
    auth: bool = True


@dataclass(frozen=True)
class Process:
    """A server or worker the stack starts: how, and how to tell it is up."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(repr=False)
    health: str | None = None  # a URL answering 200 once it serves


@dataclass(frozen=True)
class State:
    """One line of ``status``: a service, whether it runs, where."""

    name: str
    running: bool
    detail: str


class Stack:
    """The services under ``folder``, with ``settings`` (else those saved, else the defaults)."""

    def __init__(self, folder: Path | str | None = None, **settings: int | bool | None) -> None:
        self.folder = Path(folder or os.environ.get(DIR_ENV) or DEFAULT_DIR).absolute()
        saved = self.folder / "stack.json"
        base = Settings(**json.loads(saved.read_text())) if saved.is_file() else Settings()
        self.settings = replace(base, **{k: v for k, v in settings.items() if v is not None})
        if self.settings.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.settings.workers}")

    # --- what clients and servers are given -----------------------------------------------------

    def secrets(self, create: bool = False) -> dict[str, str]:
        """The secrets: environment first, then ``credentials.env``; new ones written there."""
        path = self.folder / "credentials.env"
        stored = _read_env_file(path)
        found = {name: os.environ.get(name) or stored.get(name, "") for name in SECRETS}
        missing = [name for name, value in found.items() if not value]
        if missing and not create:
            raise ConfigError(
                f"no credentials for the services in {path} or the environment "
                f"({', '.join(missing)}): start them first (make services)"
            )
        if missing:
            stored |= {name: secrets.token_urlsafe(24) for name in missing}
            self.folder.mkdir(parents=True, exist_ok=True)
            lines = ["# trackflow services' secrets (services up): keep this file private"]
            lines += [f"{name}={value}" for name, value in stored.items()]
            _write_private(path, "\n".join(lines) + "\n")
            found |= {name: stored[name] for name in missing}
        return found

    def cluster(self, create: bool = False) -> Cluster:
        """The PostgreSQL cluster; ``create``: make secrets and install the server if need be."""
        return Cluster(
            self.folder / "postgres",
            self.settings.postgres_port,
            self.secrets(create)[DB_PASSWORD_ENV],
            postgres.find_binaries(install=create),
        )

    @property
    def mlflow_url(self) -> str:
        """The tracking server's URL (``MLFLOW_TRACKING_URI``)."""
        return f"http://127.0.0.1:{self.settings.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        """The Prefect server's API (``PREFECT_API_URL``)."""
        return f"http://127.0.0.1:{self.settings.prefect_port}/api"

    def client_env(self) -> dict[str, str]:
        """What a client exports to use the services: tracking, Prefect, the sweeps' storage."""
        found = self.secrets()
        env = {"MLFLOW_TRACKING_URI": self.mlflow_url, "PREFECT_API_URL": self.prefect_url}
        if self.settings.auth:
            env["MLFLOW_TRACKING_USERNAME"] = ADMIN_USER
            env["MLFLOW_TRACKING_PASSWORD"] = found[ADMIN_PASSWORD_ENV]
            env["PREFECT_API_AUTH_STRING"] = f"{ADMIN_USER}:{found[ADMIN_PASSWORD_ENV]}"
        database = Cluster(self.folder / "postgres", self.settings.postgres_port,
                           found[DB_PASSWORD_ENV], Path())  # fmt: skip
        env[SWEEP_STORAGE_ENV] = database.url("optuna")
        return env

    def processes(self, cluster: Cluster) -> list[Process]:
        """The MLflow server, the Prefect server and the workers, with their environments."""
        found = self.secrets()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
        mlflow_env = base | {"MLFLOW_BACKEND_STORE_URI": cluster.url("mlflow")}
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        argv += ["--port", str(self.settings.mlflow_port), "--workers", "2"]
        argv += ["--artifacts-destination", str(self.folder / "mlflow" / "artifacts")]
        # gunicorn, not MLflow's default uvicorn: on uvicorn's kept-alive connections every
        # request of MLflow's client answered ~45 ms late (a log_batch 56 ms, 22 ms on gunicorn;
        # a get_run 56 ms, 9 ms). Its workers are synchronous: 120 s for an artifact upload.
        argv += ["--serve-artifacts", "--gunicorn-opts", "--timeout 120"]
        if self.settings.auth:
            argv += ["--app-name", "basic-auth"]
            mlflow_env |= {
                "MLFLOW_AUTH_CONFIG_PATH": str(self._auth_config(cluster)),
                "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN_USER,
                "MLFLOW_AUTH_ADMIN_PASSWORD": found[ADMIN_PASSWORD_ENV],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": found[SECRET_KEY_ENV],
            }
        prefect_home = {"PREFECT_HOME": str(self.folder / "prefect")}
        prefect_env = base | prefect_home | {
            "PREFECT_API_DATABASE_CONNECTION_URL": cluster.url("prefect", driver="asyncpg"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }  # fmt: skip
        if self.settings.auth:
            auth = f"{ADMIN_USER}:{found[ADMIN_PASSWORD_ENV]}"
            prefect_env["PREFECT_SERVER_API_AUTH_STRING"] = auth
        port = str(self.settings.prefect_port)
        started = [
            Process("mlflow", argv, mlflow_env, f"{self.mlflow_url}/health"),
            Process(
                "prefect",
                [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
                prefect_env,
                f"{self.prefect_url}/health",
            ),
        ]
        worker_env = self._client_process_env()
        for number in range(1, self.settings.workers + 1):
            name = f"worker-{number}"
            argv = [*PREFECT, "worker", "start", "--pool", WORK_POOL, "--type", "process"]
            started.append(Process(name, [*argv, "--name", f"trackflow-{name}"], worker_env))
        return started

    def _auth_config(self, cluster: Cluster) -> Path:
        """MLflow's basic-auth settings: users and permissions in the ``mlflow_auth`` database.

        Every signed-in user may read every experiment and model (``default_permission = READ``);
        editing takes a permission the admin grants (docs/scale-out.md). A checked password is
        remembered for a minute per server worker: checking one costs a PBKDF2 hash (~0.3 s of
        CPU here), which every request of a training run would otherwise pay; the price is that
        a changed password or a deleted user still gets in for up to that minute.
        """
        text = (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {cluster.url('mlflow_auth')}\n"
            f"admin_username = {ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n"
        )
        path = self.folder / "mlflow" / "basic_auth.ini"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, text)
        return path

    # --- up, down, status -----------------------------------------------------------------------

    def up(self) -> list[str]:
        """Start what is not running (PostgreSQL first); return one line per service."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / ".gitignore").write_text("*\n")  # nothing here is ever committed
        cluster = self.cluster(create=True)
        self._check_ports(cluster)  # before starting anything: a taken port starts nothing
        lines = []
        made = postgres.ensure_cluster(cluster)
        if postgres.is_running(cluster):
            state = "running"
        else:
            postgres.start(cluster)
            state = "created" if made else "started"
        postgres.wait_until_ready(cluster)
        postgres.create_databases(cluster, DATABASES)
        lines.append(
            f"PostgreSQL  {state:<8} 127.0.0.1:{cluster.port} (databases {', '.join(DATABASES)})"
        )
        _write_json(self.folder / "stack.json", asdict(self.settings))
        waiting = []
        processes = self.processes(cluster)
        servers, workers = processes[:2], processes[2:]
        for process in servers:
            if self.pid(process.name) is None:
                waiting.append(self._start(process))
        for process, started in waiting:
            self._wait_healthy(process, started)
        access = "basic-auth" if self.settings.auth else "no authentication"
        artifacts = self.folder / "mlflow" / "artifacts"
        lines.append(
            f"MLflow      {_verb(servers[0], waiting):<8} {self.mlflow_url} ({access}; "
            f"artifacts proxied to {_shown(artifacts)})"
        )
        access = "auth string" if self.settings.auth else "no authentication"
        lines.append(f"Prefect     {_verb(servers[1], waiting):<8} {self.prefect_url} ({access})")
        if workers:
            self._ensure_pool()
        stale = [p for p in self._pid_files("worker-") if p not in {w.name for w in workers}]
        for name in stale:  # fewer workers asked for than run: stop the extra ones
            self._stop(name)
        fresh = [self._start(w) for w in workers if self.pid(w.name) is None]
        for process, started in fresh:
            self._wait_alive(process, started)
        lines.append(
            f"workers     {len(workers)} in work pool '{WORK_POOL}' ({len(fresh)} started"
            f"{f', {len(stale)} stopped' if stale else ''}), running in {Path.cwd()}"
        )
        _write_private(self.folder / "env.sh", self.env_script())
        return lines

    def _check_ports(self, cluster: Cluster) -> None:
        """Fail, naming the port and its option, when a server to start finds its port taken."""
        to_start = {
            "--postgres-port": (self.settings.postgres_port, not postgres.is_running(cluster)),
            "--mlflow-port": (self.settings.mlflow_port, self.pid("mlflow") is None),
            "--prefect-port": (self.settings.prefect_port, self.pid("prefect") is None),
        }
        for option, (port, starting) in to_start.items():
            if starting:
                _check_port_free(port, option)

    def down(self) -> list[str]:
        """Stop the workers, the servers, then PostgreSQL; the data stays for the next ``up``."""
        lines = []
        names = [*self._pid_files("worker-"), "prefect", "mlflow"]
        for name in names:
            lines.append(f"{name:<11} {'stopped' if self._stop(name) else 'was not running'}")
        cluster = self._existing_cluster()
        running = cluster is not None and postgres.is_running(cluster)
        if running:
            postgres.stop(cluster)
        lines.append(f"{'PostgreSQL':<11} {'stopped' if running else 'was not running'}")
        return lines

    def _existing_cluster(self) -> Cluster | None:
        """The cluster ``up`` made, to ask or stop (no secrets needed); None if there is none."""
        if not (self.folder / "postgres" / "data" / "PG_VERSION").is_file():
            return None
        binaries = postgres.find_binaries(install=False)
        return Cluster(self.folder / "postgres", self.settings.postgres_port, "", binaries)

    def status(self) -> list[State]:
        """Whether each service runs, and where."""
        found = []
        cluster = self._existing_cluster()
        running = cluster is not None and postgres.is_running(cluster)
        found.append(State("PostgreSQL", running, f"127.0.0.1:{self.settings.postgres_port}"))
        found.append(State("MLflow", self.pid("mlflow") is not None, self.mlflow_url))
        found.append(State("Prefect", self.pid("prefect") is not None, self.prefect_url))
        for number in range(1, self.settings.workers + 1):
            name = f"worker-{number}"
            found.append(State(name, self.pid(name) is not None, f"work pool '{WORK_POOL}'"))
        return found

    def env_script(self) -> str:
        """``export`` lines of :meth:`client_env`, for ``source`` or ``eval``."""
        lines = ["# trackflow services: `source` this file to use them (it holds secrets)"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.client_env().items()]
        return "\n".join(lines) + "\n"

    def shown_env(self) -> list[str]:
        """The client variables with their secrets masked: what may be printed."""
        return [
            f"{k}={'********' if k in SECRET_VARIABLES else v}"
            for k, v in self.client_env().items()
        ]

    # --- processes --------------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """The pid of the stack's process ``name`` if it runs (a stale pid file is removed)."""
        path = self.folder / "run" / f"{name}.pid"
        try:
            record = json.loads(path.read_text())
            cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().decode()
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
            return None
        if cmdline.split("\0")[:-1] != record["argv"]:  # gone; its pid may be another's now
            path.unlink(missing_ok=True)
            return None
        return int(record["pid"])

    def _pid_files(self, prefix: str) -> list[str]:
        return sorted(p.stem for p in (self.folder / "run").glob(f"{prefix}*.pid"))

    def _start(self, process: Process) -> tuple[Process, subprocess.Popen]:
        for folder in ("run", "logs"):
            (self.folder / folder).mkdir(parents=True, exist_ok=True)
        log = (self.folder / "logs" / f"{process.name}.log").open("ab")
        started = subprocess.Popen(
            process.argv,
            env=process.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: down stops it with its children
        )
        log.close()
        _write_json(self.folder / "run" / f"{process.name}.pid",
                    {"pid": started.pid, "argv": process.argv})  # fmt: skip
        return process, started

    def _wait_healthy(self, process: Process, started: subprocess.Popen) -> None:
        import requests

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(process, started)
            try:
                if requests.get(process.health, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self._stop(process.name)
        raise ConfigError(
            f"{process.name} did not answer at {process.health} within {START_TIMEOUT_S} s; "
            f"its log: {self._log(process.name)}"
        )

    def _wait_alive(self, process: Process, started: subprocess.Popen, settle_s: float = 3) -> None:
        time.sleep(settle_s)
        self._check_alive(process, started)

    def _check_alive(self, process: Process, started: subprocess.Popen) -> None:
        if started.poll() is None:
            return
        (self.folder / "run" / f"{process.name}.pid").unlink(missing_ok=True)
        tail = self._log(process.name).read_text(errors="replace").strip().splitlines()[-15:]
        raise ConfigError(
            f"{process.name} exited at start (status {started.returncode}); the end of its log "
            f"({self._log(process.name)}):\n  " + "\n  ".join(tail)
        )

    def _log(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def _stop(self, name: str, timeout: float = 20) -> bool:
        """Stop a process of the stack and its children; return whether it was running."""
        pid = self.pid(name)
        if pid is None:
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.2)
            if not _group_alive(pid):
                break
        (self.folder / "run" / f"{name}.pid").unlink(missing_ok=True)
        return True

    def _ensure_pool(self) -> None:
        """Create the ``process`` work pool the deployments name, unless it exists."""
        env = self._client_process_env()
        inspect = subprocess.run([*PREFECT, "work-pool", "inspect", WORK_POOL], env=env,
                                 capture_output=True, text=True)  # fmt: skip
        if inspect.returncode == 0:
            return
        create = [*PREFECT, "work-pool", "create", WORK_POOL, "--type", "process"]
        result = subprocess.run(create, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ConfigError(
                f"creating the work pool '{WORK_POOL}' failed: {result.stdout + result.stderr}"
            )

    def _client_process_env(self) -> dict[str, str]:
        """A worker's or the pool command's environment: the services' variables, not the caller's.

        The Prefect home is the stack's.
        """
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
        return base | self.client_env() | {"PREFECT_HOME": str(self.folder / "prefect")}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader (its parent has not reaped it) counts as gone.
    try:
        return "zombie" not in Path(f"/proc/{pgid}/status").read_text().lower()
    except OSError:
        return True


def _verb(process: Process, waiting: list[tuple[Process, subprocess.Popen]]) -> str:
    return "started" if any(p.name == process.name for p, _ in waiting) else "running"


def _check_port_free(port: int, option: str) -> None:
    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise ConfigError(
                f"port {port} on 127.0.0.1 is taken by a program the services did not start: "
                f"stop it or choose another port ({option})"
            )


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of a file (``#`` comments skipped); empty when there is no file."""
    if not path.is_file():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.lstrip().startswith("#"):
            found[name.strip()] = value.strip()
    return found


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
