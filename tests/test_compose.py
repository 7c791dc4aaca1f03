"""docker-compose.yml: Debian's docker-compose 1.29 accepts it, and it keeps the stack's rules
(127.0.0.1-only ports, healthchecks, health-conditioned depends_on, named volumes, no secrets,
token-authenticated Ray, GPUs only in a profile). No container engine is needed."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from stack import COMPOSE_FILE, ROOT, interpolate, load_compose, service_command

ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "ray-worker-gpu", "optuna-dashboard"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$", re.I)
REF = r"\$\{\w+(?::?[-?][^}]*)?\}"


@pytest.fixture(scope="module")
def compose():
    return load_compose()


def strings(node) -> list[str]:
    """Every string in the parsed file (keys and values), comments excluded."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_docker_compose_v1_validates_it():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's: apt-get install docker-compose)")
    res = subprocess.run([exe, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "config", "-q"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([exe, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "--profile", "gpu",
                          "config", "--services"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and set(res.stdout.split()) == SERVICES, res.stderr


def test_harness_reads_commands_as_docker_compose_does(compose):
    """tests/stack.py interpolates the commands the way docker-compose itself does."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    res = subprocess.run([exe, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)["services"]
    for name in ("mlflow", "ray-head", "ray-worker", "optuna-dashboard"):
        theirs = resolved[name]["command"]
        theirs = shlex.split(theirs) if isinstance(theirs, str) else theirs
        assert service_command(compose, name, env_example()) == theirs, name


def test_expected_services_and_no_top_level_name(compose):
    assert set(compose["services"]) == SERVICES
    assert "name" not in compose  # docker-compose v1 rejects it
    assert "version" not in compose  # v1.29 reads the Compose spec without one


def test_published_ports_bound_to_localhost(compose):
    published = 0
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
            published += 1
        assert "network_mode" not in svc, name  # host networking would bypass the bindings
    assert published >= 4


def test_every_service_has_a_healthcheck_and_health_conditioned_dependencies(compose):
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must use conditions"
        for dep, cond in deps.items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
    assert set(compose["services"]["ray-worker"]["depends_on"]) == {"ray-head"}
    assert "postgres" in compose["services"]["mlflow"]["depends_on"]
    assert "postgres" in compose["services"]["optuna-dashboard"]["depends_on"]


def test_named_volumes_declared_and_used(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source")
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, (name, source)
                used.add(source)
    assert used == declared and declared
    mounts = {v.split(":")[1] for v in compose["services"]["postgres"]["volumes"]}
    assert {"/var/lib/postgresql/data", "/docker-entrypoint-initdb.d"} <= mounts
    mlflow_cmd = compose["services"]["mlflow"]["command"]
    artifacts = mlflow_cmd.split("--artifacts-destination")[1].split()[0]
    assert any(v.endswith(":" + artifacts) for v in compose["services"]["mlflow"]["volumes"])


def secret_problems(compose: dict) -> list[str]:
    """Literal secrets in environment entries or commands (a ${...} reference is fine)."""
    problems = []
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        if not isinstance(env, dict):
            problems.append(f"{name}: use the mapping form for environment")
            continue
        for key, value in env.items():
            value = "" if value is None else str(value)
            if SECRET_NAME.search(key) and not re.fullmatch(REF, value):
                problems.append(f"{name}.{key} is not a ${{...}} reference")
            for userinfo in re.findall(r"://(\S+?)@", value):  # user:password@host
                user_pass = re.sub(REF, "REF", userinfo).split(":", 1)
                if len(user_pass) == 2 and user_pass[1] != "REF":
                    problems.append(f"{name}.{key} has a literal password in a URL")
        command = svc.get("command", "")
        command = command if isinstance(command, str) else " ".join(command)
        for userinfo in re.findall(r"://(\S+?)@", command):
            if ":" in re.sub(REF, "REF", userinfo):
                problems.append(f"{name}: password on the command line (pass it as PGPASSWORD)")
    return problems


def test_no_plaintext_secrets(compose):
    assert secret_problems(compose) == []
    text = COMPOSE_FILE.read_text()
    for value in env_example().values():  # no .env.example placeholder copied into the file
        if "change-me" in value:
            assert value not in text
    bad = {"services": {"x": {"environment": {"DB_PASSWORD": "hunter2", "URI": "postgresql://u:pw@h/db",
                                              "OK": "postgresql://u:${P:?}@h/db"},
                              "command": "tool --db postgresql+psycopg2://u:${P}@h/db"}}}
    assert len(secret_problems(bad)) == 3


def test_required_variables_are_in_env_example(compose):
    text = "\n".join(strings(compose))
    required = set(re.findall(r"\$\{(\w+):?\?", text))
    assert {"POSTGRES_PASSWORD", "OPTUNA_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "RAY_AUTH_TOKEN"} <= required
    example = env_example()
    assert required <= set(example), required - set(example)
    for name in required:
        assert example[name], name
        if SECRET_NAME.search(name):
            assert "change-me" in example[name], f"{name} must be an obvious placeholder"
    assert "change me" in ENV_EXAMPLE.read_text().lower()
    # Every variable the file uses is documented there.
    assert set(re.findall(r"\$\{(\w+)", text)) <= set(example)


def test_mlflow_server_command(compose):
    svc = compose["services"]["mlflow"]
    args = shlex.split(svc["command"])
    assert args[:2] == ["mlflow", "server"]
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:5000", "localhost:*", "127.0.0.1:*"} <= set(hosts)
    assert args[args.index("--artifacts-destination") + 1].startswith("/")
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert svc["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
    assert "--app-name" not in args  # switched on by MLFLOW_APP_NAME through mlflow/entrypoint.sh
    auth = {"MLFLOW_APP_NAME", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert auth <= set(svc["environment"])
    assert "MLFLOW_APP_NAME" in (ROOT / "mlflow" / "entrypoint.sh").read_text()


def test_storage_urls_use_psycopg2(compose):
    for name in ("mlflow", "optuna-dashboard"):
        urls = re.findall(r"postgres\w*(?:\+\w+)?://", compose["services"][name]["command"])
        assert urls == ["postgresql+psycopg2://"], name  # plain postgresql:// means psycopg 3 in SQLAlchemy 2.1


def test_ray_services_use_token_auth_and_shared_memory(compose):
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        svc = compose["services"][name]
        assert svc["environment"]["RAY_AUTH_MODE"] == "token", name
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]*\}", svc["environment"]["RAY_AUTH_TOKEN"]), name
        assert svc.get("shm_size"), name
        args = shlex.split(svc["command"])
        assert args[:2] == ["ray", "start"] and "--block" in args, name
        assert "--disable-usage-stats" in args, name
        assert "ports" not in svc or name == "ray-head", name  # workers scale: no fixed host ports
        assert "container_name" not in svc, name
    head = shlex.split(compose["services"]["ray-head"]["command"])
    assert "--head" in head and "--dashboard-host=0.0.0.0" in head and "--dashboard-port=8265" in head
    assert compose["services"]["ray-head"]["ports"] == ["127.0.0.1:${RAY_DASHBOARD_HOST_PORT:-8265}:8265"]


def test_gpu_reservation_only_in_a_profile(compose):
    for name, svc in compose["services"].items():
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if devices:
            assert svc.get("profiles") == ["gpu"], name
            assert any("gpu" in d.get("capabilities", []) for d in devices)
        assert "runtime" not in svc, name
    assert compose["services"]["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert all("profiles" not in svc for n, svc in compose["services"].items() if n != "ray-worker-gpu")


def test_init_script_creates_both_databases_from_the_environment(compose):
    script = (ROOT / "docker" / "postgres-init" / "10-lbsearch-databases.sh").read_text()
    assert "CREATE DATABASE optuna" in script and "CREATE DATABASE mlflow" in script
    env = compose["services"]["postgres"]["environment"]
    for var in ("OPTUNA_DB_USER", "OPTUNA_DB_PASSWORD", "MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD"):
        assert var in script and var in env, var


def test_interpolate_follows_compose_rules():
    v = {"A": "a", "E": ""}
    assert interpolate("$A ${A} ${E:-d} ${E-d} ${U:-d} $$A", v) == "a a d  d $A"
    with pytest.raises(KeyError, match="msg"):
        interpolate("${E:?msg}", v)
