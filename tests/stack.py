"""The docker-compose stack, started as plain processes on this machine (no container engine).

    from stack import Stack, missing_requirements

    with Stack() as stack:                     # PostgreSQL, MLflow, Ray head + 1 node, optuna-dashboard
        optuna.storages.RDBStorage(stack.storage_url, engine_kwargs={"pool_pre_ping": True})
        MlflowClient(stack.mlflow_uri)
        subprocess.run(["ray", "job", "submit", "--address", stack.ray_dashboard_url, ...], env=stack.env)
        stack.restart_postgres(); stack.stop_mlflow(); stack.start_mlflow(); stack.kill_ray_node_raylet()
        stack.start_ray_node(); stack.processes_with_args("--out", "/some/run")   # e.g. a Ray job's driver

The commands, environments and healthchecks are read from docker-compose.yml and interpolated the
way docker-compose does; only what differs outside containers is replaced: container hosts
(`postgres:5432`, `ray-head:6379`) by 127.0.0.1, fixed ports by free ones, volumes by a temporary
directory, sizes by what a 2-core machine affords. PostgreSQL is Debian's server (as the `postgres`
user when run as root) with the databases made by docker/postgres-init's script; MLflow starts
through mlflow/entrypoint.sh and optuna-dashboard through docker/optuna-dashboard-entrypoint.sh, as in
their images.

Every process is started in its own session with a marker in its environment and recorded by PID;
stop() (also on errors, and at exit) kills each recorded process tree and anything else carrying
the marker, SIGTERM then SIGKILL. `ray stop` is never used: it would stop every Ray on the machine.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
INIT_SCRIPT_DIR = ROOT / "docker" / "postgres-init"
MLFLOW_ENTRYPOINT = ROOT / "mlflow" / "entrypoint.sh"
DASHBOARD_ENTRYPOINT = ROOT / "docker" / "optuna-dashboard-entrypoint.sh"
MARKER = "LBSEARCH_TEST_STACK"


# ---------------------------------------------------------------- docker-compose.yml, read like compose

def load_compose(path: Path = COMPOSE_FILE) -> dict:
    return yaml.safe_load(Path(path).read_text())


_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """docker-compose's `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`."""
    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, arg = (m.group(2), m.group(3), m.group(4)) if m.group(2) else (m.group(5), None, None)
        value = variables.get(name)
        if op in (":-", "-"):
            return arg if value is None or (op == ":-" and value == "") else value
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise KeyError(f"required variable {name} is not set: {arg}")
        return value or ""
    return _VAR.sub(one, text)


def service_command(compose: dict, service: str, variables: dict[str, str]) -> list[str]:
    command = compose["services"][service]["command"]
    if isinstance(command, str):
        return shlex.split(interpolate(command, variables))
    return [interpolate(str(a), variables) for a in command]


def service_environment(compose: dict, service: str, variables: dict[str, str]) -> dict[str, str]:
    env = compose["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, variables.get(e, "")) for e in env)
    return {k: interpolate("" if v is None else str(v), variables) for k, v in env.items()}


def healthcheck_command(compose: dict, service: str, ports: dict[int, int]) -> list[str]:
    """The service's healthcheck test with `127.0.0.1:<container port>` mapped to the local port."""
    test = compose["services"][service]["healthcheck"]["test"]
    test = ["CMD-SHELL", test] if isinstance(test, str) else list(test)
    args = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    args = [sys.executable if a == "python" else a for a in args]
    for inside, outside in ports.items():
        args = [re.sub(rf"127\.0\.0\.1:{inside}\b", f"127.0.0.1:{outside}", a) for a in args]
    return args


def set_flag(args: list[str], flag: str, value: str | int) -> list[str]:
    """Replace `--flag=v` / `--flag v` in args by `--flag=value`, or append it."""
    out, i, done = [], 0, False
    while i < len(args):
        a = args[i]
        if a == flag or a.startswith(flag + "="):
            i += 1 if "=" in a else 2
            if not done:
                out.append(f"{flag}={value}")
                done = True
            continue
        out.append(a)
        i += 1
    return out if done else out + [f"{flag}={value}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str) -> str:
    """A console script of this interpreter's environment (`ray`, `mlflow`, ...), else from PATH."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else (shutil.which(name) or name)


def _pg_binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def missing_requirements() -> str | None:
    """Why the stack cannot start here (None when it can)."""
    for name in ("initdb", "pg_ctl"):
        if not _pg_binary(name):
            return f"PostgreSQL server binaries not found ({name}): apt-get install postgresql"
    if not shutil.which("psql"):
        return "psql not found: apt-get install postgresql-client"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root needs runuser to start PostgreSQL as the postgres user"
    for module in ("ray", "mlflow", "optuna", "optuna_dashboard", "psycopg2"):
        if importlib.util.find_spec(module) is None:
            return f"Python package {module} is not installed"
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        return "the Ray dashboard (job submission) needs ray[default]: pip install 'ray[default]==2.60.0'"
    return None


# ---------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that started it dies (the test killed hard).
    Ray's own reaper then takes each node's process group down. Start a Stack from a thread that
    outlives it (the main thread)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _ctime(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _alive(pid: int, ctime: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == ctime and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class StackError(RuntimeError):
    pass


class Stack:
    """The compose services as local processes; see the module docstring."""

    def __init__(self, *, ray: bool = True, mlflow: bool = True, dashboard: bool = True,
                 compose_file: Path = COMPOSE_FILE, start_timeout: float = 120.0):
        self.want_ray, self.want_mlflow, self.want_dashboard = ray, mlflow, dashboard
        self.compose = load_compose(compose_file)
        self.start_timeout = start_timeout
        self.id = secrets.token_hex(8)
        # The harness's ".env": every secret is random per stack.
        self.variables = {
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "OPTUNA_DB_USER": "optuna", "OPTUNA_DB_PASSWORD": secrets.token_hex(16),
            "MLFLOW_DB_USER": "mlflow", "MLFLOW_DB_PASSWORD": secrets.token_hex(16),
            "RAY_AUTH_TOKEN": secrets.token_hex(24),
            "RAY_HEAD_NUM_CPUS": "1", "RAY_OBJECT_STORE_MEMORY": "100000000",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_APP_NAME": "",
        }
        self.tmp: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[int, float] = {}  # every process seen as ours: pid -> create time
        self.ports: dict[str, int] = {}
        self._postmaster: int | None = None
        self._stopped = False

    # ---- what clients need
    @property
    def storage_url(self) -> str:
        v = self.variables
        return (f"postgresql+psycopg2://{v['OPTUNA_DB_USER']}:{v['OPTUNA_DB_PASSWORD']}"
                f"@127.0.0.1:{self.ports['postgres']}/optuna")

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ports['ray_gcs']}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['ray_dashboard']}"

    @property
    def optuna_dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['optuna_dashboard']}"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus Ray's token auth, for client commands (`ray status`, `ray job submit`)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", MARKER)}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.variables["RAY_AUTH_TOKEN"])
        return env

    # ---- lifecycle
    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Stack":
        self.tmp = Path(tempfile.mkdtemp(prefix="lbs", dir="/tmp"))  # short: Ray's socket paths
        self.tmp.chmod(0o755)  # the postgres user must reach its data directory
        atexit.register(self.stop)
        try:
            for name in ("postgres", "mlflow", "ray_gcs", "ray_dashboard", "ray_client", "ray_head_agent",
                         "ray_node_agent", "optuna_dashboard"):
                self.ports[name] = free_port()
            self._start_postgres(init=True)
            if self.want_mlflow:
                self.start_mlflow(wait=False)
            if self.want_dashboard:
                self._start_optuna_dashboard()
            if self.want_ray:
                self._start_ray_head()
                self._wait_healthy("ray-head", "ray_head", {8265: self.ports["ray_dashboard"]})
                self._start_ray_node()
                self._wait_healthy("ray-worker", "ray_node", {52365: self.ports["ray_node_agent"]})
            if self.want_mlflow:
                self._wait_healthy("mlflow", "mlflow", {5000: self.ports["mlflow"]})
            if self.want_dashboard:
                self._wait_healthy("optuna-dashboard", "optuna_dashboard", {8080: self.ports["optuna_dashboard"]})
            self._remember()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill everything this stack started (idempotent)."""
        if self._stopped or self.tmp is None:
            return
        self._stopped = True
        try:
            if self._postmaster is not None and Path(self.tmp, "pg", "data", "postmaster.pid").exists():
                self._pg_ctl("stop", "-m", "fast", check=False, timeout=30)
        finally:
            self._remember()
            self._kill([pid for pid in self.pids] + self._marked())
            for proc in self.procs.values():
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
            atexit.unregister(self.stop)
            if not self.alive_pids():
                shutil.rmtree(self.tmp, ignore_errors=True)

    def alive_pids(self) -> list[int]:
        """Processes this stack started (or their descendants) that are still running."""
        self._remember()
        return sorted(pid for pid, ctime in self.pids.items() if _alive(pid, ctime))

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.tmp / f"{name}.log" if self.tmp else None
        return path.read_text(errors="replace")[-tail:] if path and path.exists() else ""

    # ---- fault injection, for tests
    def restart_postgres(self) -> None:
        """Fast-stop and restart the PostgreSQL server (same port and data); clients' connections break."""
        self.stop_postgres()
        self.start_postgres()

    def stop_postgres(self) -> None:
        """Fast-stop the PostgreSQL server: clients' connections break, new ones are refused."""
        self._pg_ctl("stop", "-m", "fast", timeout=30)

    def start_postgres(self) -> None:
        """Start the stopped PostgreSQL server again (same port and data)."""
        self._start_postgres(init=False)

    def stop_mlflow(self) -> None:
        proc = self.procs.pop("mlflow", None)
        if proc is not None:
            self._kill([proc.pid])
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    def start_mlflow(self, wait: bool = True) -> None:
        cmd = service_command(self.compose, "mlflow", self.variables)
        cmd = [self._localize(a) for a in cmd]
        cmd = set_flag(cmd, "--host", "127.0.0.1")
        cmd = set_flag(cmd, "--port", self.ports["mlflow"])
        cmd = set_flag(cmd, "--workers", 1)
        cmd = set_flag(cmd, "--artifacts-destination", str(self.tmp / "mlartifacts"))
        env = service_environment(self.compose, "mlflow", self.variables)
        cmd = [console_script(cmd[0]), *cmd[1:]]
        self._spawn("mlflow", ["sh", str(MLFLOW_ENTRYPOINT), *cmd], env, cwd=self.tmp)
        if wait:
            self._wait_healthy("mlflow", "mlflow", {5000: self.ports["mlflow"]})

    def kill_ray_node_raylet(self) -> int:
        """SIGKILL the second Ray node's raylet (a node loss); returns its PID."""
        import psutil

        node = psutil.Process(self.procs["ray_node"].pid)
        for child in node.children(recursive=True):
            if child.name() == "raylet":
                self._remember()
                child.send_signal(signal.SIGKILL)
                return child.pid
        raise StackError("the second Ray node has no raylet")

    def lose_ray_node(self) -> list[int]:
        """SIGKILL every process of the second Ray node at once, its workers included (the machine
        is lost; killing the raylet alone leaves its workers a moment to finish a task and reply to
        the driver directly); returns their PIDs."""
        import psutil

        node = psutil.Process(self.procs["ray_node"].pid)
        self._remember()
        doomed = node.children(recursive=True)
        if not any(p.name() == "raylet" for p in doomed):
            raise StackError("the second Ray node has no raylet")
        for proc in doomed:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(doomed, timeout=30)
        return [p.pid for p in doomed]

    def start_ray_node(self, timeout: float = 60.0) -> None:
        """Start the second Ray node again (after lose_ray_node or kill_ray_node_raylet) and wait until it is healthy."""
        old = self.procs.get("ray_node")
        if old is not None:
            old.wait(timeout=timeout)  # `ray start --block` takes the lost node's processes down first
        self.ports["ray_node_agent"] = free_port()
        self._start_ray_node()
        self._wait_healthy("ray-worker", "ray_node", {52365: self.ports["ray_node_agent"]})
        self._remember()

    def processes_with_args(self, *args: str) -> list[int]:
        """PIDs of this stack's processes (a Ray job's driver included) whose command line holds
        ``args`` as consecutive arguments."""
        import psutil

        found = []
        for pid in self._marked():
            with contextlib.suppress(psutil.Error):
                cmd = psutil.Process(pid).cmdline()
                if any(cmd[i:i + len(args)] == list(args) for i in range(len(cmd))):
                    found.append(pid)
        return found

    # ---- services
    def _localize(self, arg: str) -> str:
        arg = re.sub(r"@postgres:5432\b", f"@127.0.0.1:{self.ports['postgres']}", arg)
        return re.sub(r"\bray-head:6379\b", self.ray_address, arg)

    def _as_postgres(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def _pg_ctl(self, *args: str, check: bool = True, timeout: float = 60):
        pg = self.tmp / "pg"
        cmd = self._as_postgres([_pg_binary("pg_ctl"), "-D", str(pg / "data"), "-w", "-t", "30", *args])
        res = subprocess.run(cmd, env=self._env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise StackError(f"pg_ctl {' '.join(args)} failed:\n{res.stdout}{res.stderr}\n{self.log('postgres')}")
        return res

    def _start_postgres(self, init: bool) -> None:
        pg = self.tmp / "pg"
        if init:
            pg.mkdir()
            if os.geteuid() == 0:
                shutil.chown(pg, "postgres", "postgres")
            pg.chmod(0o700)
            res = subprocess.run(
                self._as_postgres([_pg_binary("initdb"), "-D", str(pg / "data"), "-U", "postgres",
                                   "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]),
                env=self._env(), capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise StackError(f"initdb failed:\n{res.stdout}{res.stderr}")
        opts = f"-p {self.ports['postgres']} -k {pg} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-l", str(pg / "postgres.log"), "-o", opts, "start")
        self._postmaster = int((pg / "data" / "postmaster.pid").read_text().split()[0])
        self._remember(self._postmaster)
        if init:  # the compose service's environment, fed to the same init script(s)
            env = self._env(service_environment(self.compose, "postgres", self.variables))
            env.update(PGHOST=str(pg), PGPORT=str(self.ports["postgres"]))
            for script in sorted(INIT_SCRIPT_DIR.glob("*.sh")):
                res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
                if res.returncode != 0:
                    raise StackError(f"{script.name} failed:\n{res.stdout}{res.stderr}")

    def _start_ray_head(self) -> None:
        cmd = service_command(self.compose, "ray-head", self.variables)
        cmd = set_flag(cmd, "--port", self.ports["ray_gcs"])
        cmd = set_flag(cmd, "--dashboard-host", "127.0.0.1")
        cmd = set_flag(cmd, "--dashboard-port", self.ports["ray_dashboard"])
        cmd = self._ray_local_flags(cmd, "ray_head_agent")
        cmd = set_flag(cmd, "--ray-client-server-port", self.ports["ray_client"])
        self._spawn("ray_head", cmd, service_environment(self.compose, "ray-head", self.variables))

    def _start_ray_node(self) -> None:
        cmd = [self._localize(a) for a in service_command(self.compose, "ray-worker", self.variables)]
        cmd = set_flag(cmd, "--num-cpus", 1)
        cmd = self._ray_local_flags(cmd, "ray_node_agent")
        self._spawn("ray_node", cmd, service_environment(self.compose, "ray-worker", self.variables))

    def _ray_local_flags(self, cmd: list[str], agent: str) -> list[str]:
        cmd = set_flag(cmd, "--object-store-memory", self.variables["RAY_OBJECT_STORE_MEMORY"])
        cmd = set_flag(cmd, "--temp-dir", str(self.tmp / "ray"))
        return set_flag(cmd, "--dashboard-agent-listen-port", self.ports[agent])

    def _start_optuna_dashboard(self) -> None:
        cmd = [self._localize(a) for a in service_command(self.compose, "optuna-dashboard", self.variables)]
        cmd = set_flag(cmd, "--host", "127.0.0.1")
        cmd = set_flag(cmd, "--port", self.ports["optuna_dashboard"])
        cmd = [console_script(cmd[0]), *cmd[1:]]
        env = service_environment(self.compose, "optuna-dashboard", self.variables)
        env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"  # its `python`
        self._spawn("optuna_dashboard", ["sh", str(DASHBOARD_ENTRYPOINT), *cmd], env, cwd=self.tmp)

    # ---- plumbing
    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(extra or {})
        env[MARKER] = self.id
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        if cmd[0] in ("ray", "mlflow", "optuna-dashboard"):
            cmd = [console_script(cmd[0]), *cmd[1:]]
        log = open(self.tmp / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(cmd, env=self._env(env), cwd=cwd or self.tmp, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.procs[name] = proc
        self._remember(proc.pid)

    def _wait_healthy(self, service: str, name: str, ports: dict[int, int]) -> None:
        """Run the compose healthcheck until it passes (the process must stay up meanwhile)."""
        check = healthcheck_command(self.compose, service, ports)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            if subprocess.run(check, capture_output=True, timeout=30).returncode == 0:
                self._remember()
                return
            time.sleep(0.5)
        raise StackError(f"{service} not healthy after {self.start_timeout:.0f}s:\n{self.log(name)}")

    def _remember(self, *pids: int) -> None:
        """Record the given PIDs and every descendant of every process recorded so far."""
        import psutil

        for pid in pids:
            if (ctime := _ctime(pid)) is not None:
                self.pids.setdefault(pid, ctime)
        for pid, ctime in list(self.pids.items()):
            if not _alive(pid, ctime):
                continue
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self.pids.setdefault(child.pid, child.create_time())
        for pid in self._marked():
            self.pids.setdefault(pid, _ctime(pid) or 0.0)

    def _marked(self) -> list[int]:
        """Live processes whose environment carries this stack's marker (orphans included)."""
        import psutil

        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and p.environ().get(MARKER) == self.id:
                    found.append(p.pid)
        return found

    def _kill(self, pids: list[int], grace: float = 2.0) -> None:
        """SIGTERM each process (and its descendants), SIGKILL what is left after `grace` seconds
        (Ray's gcs_server, raylets and `ray start --block` ignore SIGTERM)."""
        import psutil

        procs = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if pid in self.pids and p.create_time() != self.pids[pid]:
                    continue  # the PID was reused by someone else's process
                for q in [p, *p.children(recursive=True)]:
                    procs[q.pid] = q
                    self.pids.setdefault(q.pid, q.create_time())
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            live = [p for p in procs.values() if _alive(p.pid, self.pids[p.pid])]
            for p in live:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            deadline = time.monotonic() + wait
            while live and time.monotonic() < deadline:
                time.sleep(0.1)
                live = [p for p in live if _alive(p.pid, self.pids[p.pid])]
            if not live:
                return


@contextlib.contextmanager
def running_stack(**kwargs):
    """`with running_stack() as stack:` — Stack(**kwargs) started, always stopped."""
    stack = Stack(**kwargs)
    try:
        yield stack.start()
    finally:
        stack.stop()
