"""Static checks of the deployment files (Dockerfile, docker-compose.yml, the GPU override).

No Docker engine runs here, so these tests read the files and hold them to the deployment
contract: durable Redis, health-gated start-up, a long readiness grace period for big models,
named volumes for data and weights, a required admin secret, an opt-in GPU, a non-root image,
and environment variables that the vendor actually reads. Where a Compose CLI is installed, it
also renders both files (`config` needs no engine).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vendor_api.settings import VendorSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU_COMPOSE = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MIN_START_PERIOD_S = 300
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# ---------------------------------------------------------------- helpers
def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, enough to resolve our files."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        if op in (":-", "-") and not current:
            return arg
        if op in (":?", "?") and not current:
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _VAR.sub(one, value)


def duration_s(value: str | int | float) -> float:
    """Compose durations ('600s', '10m', '1m30s', '1h'), as Compose parses them."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unparsable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def command_words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def option_value(words: list[str], option: str) -> str | None:
    """The value after `--option` (or in `--option=value`) in an argument list."""
    for i, word in enumerate(words):
        if word == option and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for short ('src:/path[:mode]') and long volume syntax."""
    result = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        result[target] = source
    return result


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with comments dropped and continuation lines joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def exec_form(args: str) -> list[str]:
    """An instruction's JSON exec form, or its shell form split like a shell would."""
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(ins.args))
    return env


def under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def redis_service(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]["redis"]


@pytest.fixture(scope="module")
def vendor_service(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]["vendor"]


@pytest.fixture(scope="module")
def gpu_vendor() -> dict[str, Any]:
    return load_yaml(GPU_COMPOSE)["services"]["vendor"]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE.read_text())


# ---------------------------------------------------------------- redis
def test_redis_is_official_image_with_durable_appendonly(redis_service: dict[str, Any]) -> None:
    assert str(redis_service["image"]).split(":")[0] in ("redis", "docker.io/library/redis")
    assert str(redis_service["image"]).split(":")[1].startswith("7")
    words = command_words(redis_service["command"])
    assert option_value(words, "--appendonly") == "yes"
    assert option_value(words, "--appendfsync") == "everysec"
    assert option_value(words, "--maxmemory-policy") == "noeviction"


def test_redis_data_on_a_named_volume(compose: dict[str, Any], redis_service: dict[str, Any]) -> None:
    source = mounts(redis_service).get("/data")
    assert source and is_named_volume(source), "the append-only file must live on a named volume at /data"
    assert source in (compose.get("volumes") or {})


def test_redis_healthcheck_pings(redis_service: dict[str, Any]) -> None:
    check = redis_service["healthcheck"]
    words = command_words(check["test"])
    assert words[0] in ("CMD", "CMD-SHELL")
    assert "redis-cli" in " ".join(words) and "ping" in " ".join(words)
    assert duration_s(check["interval"]) <= 30


# ---------------------------------------------------------------- vendor
def test_vendor_builds_this_repository(vendor_service: dict[str, Any]) -> None:
    build = vendor_service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (COMPOSE.parent / context).resolve() == ROOT
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / dockerfile).resolve() == DOCKERFILE


def test_vendor_waits_for_healthy_redis(vendor_service: dict[str, Any]) -> None:
    assert vendor_service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert environment(vendor_service)["REDIS_URL"].startswith("redis://redis:6379")


def test_vendor_healthcheck_probes_readyz_with_a_long_start_period(vendor_service: dict[str, Any]) -> None:
    check = vendor_service["healthcheck"]
    probe = " ".join(command_words(check["test"]))
    assert "/readyz" in probe and ":8000/" in probe
    assert "curl" not in probe and "wget" not in probe, "the slim image has neither curl nor wget"
    assert duration_s(check["start_period"]) >= MIN_START_PERIOD_S
    assert duration_s(check["timeout"]) < duration_s(check["interval"])


def test_vendor_volumes_hold_data_and_model_weights(
    compose: dict[str, Any], vendor_service: dict[str, Any], instructions: list[Instruction]
) -> None:
    declared = compose.get("volumes") or {}
    vendor_mounts = mounts(vendor_service)
    for target, source in vendor_mounts.items():
        if is_named_volume(source):
            assert source in declared, f"volume {source!r} mounted at {target} is not declared"
    named_targets = [t for t, s in vendor_mounts.items() if is_named_volume(s)]
    image_env = dockerfile_env(instructions)
    data_dir = environment(vendor_service).get("VENDOR_DATA_DIR", image_env.get("VENDOR_DATA_DIR"))
    assert data_dir and any(under(data_dir, t) for t in named_targets), "VENDOR_DATA_DIR is not on a volume"
    assert any(under(image_env["HF_HOME"], t) for t in named_targets), "the Hugging Face cache is not on a volume"


def test_vendor_admin_secret_is_required(vendor_service: dict[str, Any]) -> None:
    value = environment(vendor_service)["VENDOR_ADMIN_SECRET"]
    assert re.fullmatch(r"\$\{VENDOR_ADMIN_SECRET:\?[^}]+\}", value), value
    with pytest.raises(KeyError, match="VENDOR_ADMIN_SECRET"):
        interpolate(value, {})


def test_vendor_publishes_port_8000(vendor_service: dict[str, Any]) -> None:
    targets = [str(p).rsplit(":", 1)[-1] if not isinstance(p, dict) else str(p["target"])
               for p in vendor_service["ports"]]
    assert "8000" in targets


def test_every_vendor_variable_is_a_setting(vendor_service: dict[str, Any]) -> None:
    fields = VendorSettings.model_fields
    prefix = VendorSettings.model_config["env_prefix"]
    for name in environment(vendor_service):
        if name == "REDIS_URL":
            assert name in fields["redis_url"].validation_alias.choices  # type: ignore[union-attr]
            continue
        assert name.startswith(prefix) and name[len(prefix):].lower() in fields, f"{name} is not a VendorSettings field"


def test_vendor_environment_defaults_are_valid_settings(
    vendor_service: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only the required secret given, every `${VAR:-default}` must parse (e.g. no `VAR=`
    for an int setting), and the result must be the intended deployment."""
    for key in list(os.environ):
        if key.startswith("VENDOR_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    resolved = {k: interpolate(v, {"VENDOR_ADMIN_SECRET": "s3cret"}) for k, v in environment(vendor_service).items()}
    for key, value in resolved.items():
        monkeypatch.setenv(key, value)
    settings = VendorSettings()
    assert settings.redis_url == resolved["REDIS_URL"]
    assert settings.admin_secret is not None and settings.admin_secret.get_secret_value() == "s3cret"
    assert settings.teacher is None or ":" in settings.teacher
    assert settings.device in ("auto", "cpu")


# ---------------------------------------------------------------- GPU override
def test_gpu_override_reserves_an_nvidia_gpu(gpu_vendor: dict[str, Any]) -> None:
    devices = gpu_vendor["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        and (d.get("count") in (1, "all") or d.get("device_ids"))
        for d in devices
    )
    assert interpolate(environment(gpu_vendor)["VENDOR_DEVICE"], {}).startswith("cuda")


def test_gpu_override_builds_cuda_torch(gpu_vendor: dict[str, Any], vendor_service: dict[str, Any]) -> None:
    index = interpolate(gpu_vendor["build"]["args"]["TORCH_INDEX_URL"], {})
    assert re.search(r"/whl/cu\d+$", index), index
    assert gpu_vendor["image"] != vendor_service.get("image"), "the CUDA image must not overwrite the CPU tag"


def test_plain_compose_needs_no_gpu(vendor_service: dict[str, Any]) -> None:
    assert "devices" not in str(vendor_service.get("deploy", {}))
    assert not interpolate(environment(vendor_service).get("VENDOR_DEVICE", ""), {}).startswith("cuda")
    args = vendor_service["build"].get("args", {}) if isinstance(vendor_service["build"], dict) else {}
    assert "/cu" not in interpolate(args.get("TORCH_INDEX_URL", ""), {})


# ---------------------------------------------------------------- Dockerfile
def test_dockerfile_base_is_slim_python_311(instructions: list[Instruction]) -> None:
    base = next(i for i in instructions if i.keyword == "FROM").args.split()[0]
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base


def test_dockerfile_installs_this_package_by_name(instructions: list[Instruction]) -> None:
    """pip refuses a `NAME @ file://` tree whose metadata has another name, so the build fails
    on a rename; this test fails first, when the Dockerfile names a different project."""
    name = pyproject()["project"]["name"]
    installs = [i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    pattern = rf"""["']?{re.escape(name)}(\[[\w,-]+\])?\s*@\s*file://"""
    assert any(re.search(pattern, run) for run in installs), f"no RUN pip install of {name!r} @ file://"


def test_dockerfile_runs_as_non_root(instructions: list[Instruction]) -> None:
    users = [i.args.split(":")[0] for i in instructions if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(n for n, i in enumerate(instructions) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in instructions[last_user:]), "RUN after USER would need root"


def test_dockerfile_serves_on_all_interfaces(instructions: list[Instruction]) -> None:
    assert "8000" in [i.args.split("/")[0] for i in instructions if i.keyword == "EXPOSE"]
    entry = [i for i in instructions if i.keyword in ("ENTRYPOINT", "CMD")]
    words = [w for i in entry for w in exec_form(i.args)]
    assert words[:2] == ["vendor-api", "serve"], words
    assert option_value(words, "--host") == "0.0.0.0" and option_value(words, "--port") == "8000"
    assert "vendor-api" in pyproject()["project"]["scripts"]


def test_dockerfile_healthcheck_probes_readyz(instructions: list[Instruction]) -> None:
    check = [i.args for i in instructions if i.keyword == "HEALTHCHECK"]
    assert len(check) == 1
    options, _, command = check[0].partition(" CMD ")
    assert "/readyz" in command and ":8000/" in command and "python" in command
    start_period = re.search(r"--start-period=(\S+)", options)
    assert start_period and duration_s(start_period.group(1)) >= MIN_START_PERIOD_S


def test_dockerfile_volumes_hold_data_and_caches(instructions: list[Instruction]) -> None:
    env = dockerfile_env(instructions)
    volumes = [p for i in instructions if i.keyword == "VOLUME" for p in exec_form(i.args)]
    for variable in ("VENDOR_DATA_DIR", "HF_HOME"):
        assert any(under(env[variable], v) for v in volumes), f"{variable}={env.get(variable)} is not on a VOLUME"
    for name in env:
        if name.startswith("VENDOR_"):
            assert name.removeprefix("VENDOR_").lower() in VendorSettings.model_fields, name


def test_dockerignore_keeps_secrets_and_venv_out_but_sources_in() -> None:
    ignored = {line.strip().strip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "var", ".git", ".env"} <= ignored
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", pyproject()["project"]["readme"]}
    assert not needed & ignored, f"the build needs {sorted(needed & ignored)}"


# ---------------------------------------------------------------- Compose CLI, where installed
def compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def render(cli: list[str], files: list[Path], env: dict[str, str], env_file: Path) -> subprocess.CompletedProcess[str]:
    """`config` of `files`, with an empty env file so a developer's `.env` cannot leak in."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VENDOR_", "TORCH_INDEX"))}
    args = [*cli, "--env-file", str(env_file), *[a for f in files for a in ("-f", str(f))], "config"]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**clean, **env}, timeout=60)


def test_compose_cli_renders_both_files(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` plugin or docker-compose binary; the YAML checks above still ran")
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    missing = render(cli, [COMPOSE], {}, env_file)
    assert missing.returncode != 0 and "VENDOR_ADMIN_SECRET" in missing.stderr
    plain = render(cli, [COMPOSE], {"VENDOR_ADMIN_SECRET": "s3cret"}, env_file)
    assert plain.returncode == 0, plain.stderr
    assert "nvidia" not in plain.stdout
    gpu = render(cli, [COMPOSE, GPU_COMPOSE], {"VENDOR_ADMIN_SECRET": "s3cret"}, env_file)
    assert gpu.returncode == 0, gpu.stderr
    vendor = yaml.safe_load(gpu.stdout)["services"]["vendor"]
    assert vendor["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert vendor["environment"]["VENDOR_DEVICE"] == "cuda"
    assert vendor["depends_on"]["redis"]["condition"] == "service_healthy"


def test_dockerfile_installs_the_demo_teachers_debian_packages(instructions: list[Instruction]) -> None:
    """With VENDOR_TEACHER empty the container builds the demo teacher, which reads these."""
    import re

    wanted = set(re.findall(r"missing\+=\(([\w-]+)\)", (ROOT / "scripts" / "system-packages.sh").read_text()))
    assert wanted == {"dataset-fashion-mnist", "fonts-noto-color-emoji"}
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "apt-get install" in runs and all(package in runs for package in wanted)
