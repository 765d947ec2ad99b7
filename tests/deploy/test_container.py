"""The Dockerfile and docker-compose.yml, checked without a Docker engine: hadolint, `docker compose config`,
and what each promises (GPU reservation, health checks, start order, a non-root user, the server extra only)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, venv_tool

DOCKERFILE = ROOT / "Dockerfile"
GPU_FILES = ("-f", "docker-compose.yml")
CPU_FILES = ("-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml")
TLS_FILES = ("-f", "docker-compose.yml", "-f", "docker-compose.tls.yml")
CPU_TLS_FILES = (*CPU_FILES, "-f", "docker-compose.tls.yml")


def stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", dockerfile)
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            result[current] = [line]
        elif current:
            result[current].append(line)
    return result


def test_hadolint_finds_nothing():
    hadolint = venv_tool("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_not_blind():
    """The same hadolint reports a classic mistake, so the clean result above means something."""
    hadolint = venv_tool("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", "-"],
        input="FROM ubuntu\nRUN cd /tmp && ls\n",
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_runtime_image_is_cuda13_cudnn9_non_root_with_the_server_extra_only():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    # The tag pattern of NVIDIA's images with cuDNN since CUDA 12: <version>-cudnn-runtime-<os>.
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    found = stages(text)
    assert {"builder", "export", "models", "runtime", "demo"} <= found.keys()
    runtime = "\n".join(found["runtime"])
    assert runtime.startswith("FROM ${CUDA_IMAGE} AS runtime")
    user = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert re.search(r"COPY --from=builder /opt/venv /opt/venv", runtime)
    # The runtime's environment comes from the builder, which installs the server extra and nothing else;
    # torch and the exporter live in the export stage only.
    installs = re.findall(r"pip install (.+)", "\n".join(found["builder"]))
    assert installs == ["'.[server]'"], installs
    assert "torch" not in runtime and "export" not in runtime.replace("EXPOSE", "")
    assert "--index-url" in "\n".join(found["export"])  # torch from the CPU index
    assert re.search(r"^HEALTHCHECK .*CMD \[.*python -m client .*health", runtime, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["python", "-m", "server"\]', runtime, re.MULTILINE)


def test_the_gpu_library_check_runs_at_build_time_and_names_what_is_missing(tmp_path: Path):
    """The runtime stage runs deploy/check-gpu-libraries.sh. Here, with onnxruntime-gpu and no CUDA libraries,
    it must fail naming the CUDA provider's linked libraries and cuDNN (loaded at run time, unseen by ldd);
    without the provider libraries at all, it must fail too."""
    import onnxruntime

    runtime = "\n".join(stages(DOCKERFILE.read_text())["runtime"])
    script = "deploy/check-gpu-libraries.sh"
    assert re.search(rf"^COPY {script} ", runtime, re.MULTILINE)
    assert re.search(r"^RUN sh \S*check-gpu-libraries\.sh /opt/venv/lib/python3\*/site-packages/onnxruntime/capi$",
                     runtime, re.MULTILINE)
    capi = Path(onnxruntime.__file__).parent / "capi"
    if not (capi / "libonnxruntime_providers_cuda.so").exists():
        pytest.fail("onnxruntime-gpu (the project's pin) is not installed", pytrace=False)
    checked = subprocess.run(["sh", ROOT / script, capi], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 1
    assert "libonnxruntime_providers_cuda.so: libcublasLt.so.13 libcublas.so.13" in checked.stderr, checked.stderr
    assert "cuDNN 9" in checked.stderr and "libcuda.so.1" not in checked.stderr
    empty = subprocess.run(["sh", ROOT / script, tmp_path], capture_output=True, text=True, timeout=60, check=False)
    assert empty.returncode == 1 and "libonnxruntime_providers_cuda.so (is onnxruntime-gpu installed?)" in empty.stderr


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        # Docker's rule: the last matching pattern wins; `!` re-includes.
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern[1:] if negate else pattern
            if fnmatch.fnmatch(path, body.rstrip("/")) or fnmatch.fnmatch(path, body.rstrip("/") + "/*"):
                result = not negate
        return result

    copies = re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    sources = [source for args in copies for source in args.split()[:-1]]  # the last one is the destination
    assert {"pyproject.toml", "README.md", "client", "server", "export"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    for unwanted in (".venv", "models", ".git", ".cache", "tests"):
        assert ignored(unwanted), f".dockerignore lets {unwanted} into the build context"


# ---------------------------------------------------------------------------------------------------------
# docker compose


@pytest.mark.parametrize(
    "files", [GPU_FILES, CPU_FILES, TLS_FILES, CPU_TLS_FILES], ids=["gpu", "cpu", "tls", "cpu-tls"]
)
def test_compose_config_is_valid(docker_compose, files):
    result = docker_compose(*files, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(docker_compose, tmp_path: Path):
    """`config -q` does validate: an unknown key fails it."""
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  server:\n    image: x\n    ports: [50051]\n    gpus_please: all\n")
    result = docker_compose("-f", str(broken), "config", "-q")
    assert result.returncode != 0 and "gpus_please" in result.stderr


def merged(docker_compose, files) -> dict:
    result = docker_compose(*files, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_gpu_stack(docker_compose):
    config = merged(docker_compose, GPU_FILES)
    services = config["services"]
    assert {"server", "nginx", "lb-agent", "prometheus", "grafana"} <= services.keys()
    server = services["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["command"] == ["--device", "cuda"]
    assert server["environment"]["NLPSERVE_VARIANT"] == "fp16"  # the demo builds model.fp16.onnx for each model
    assert server["build"]["target"] == "runtime"
    assert {p["target"] for p in server["ports"]} == {50051, 8000, 8080}
    assert server["environment"]["NLPSERVE_HTTP_PORT"] == "8080"
    assert any(v["target"] == "/models" and v.get("read_only") for v in server["volumes"])
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:4] == ["python", "-m", "client"] and test[-1] == "health"
    # nginx, prometheus and grafana start once what they depend on is healthy.
    for name, needs in (("nginx", "server"), ("prometheus", "server"), ("grafana", "prometheus")):
        assert services[name]["depends_on"][needs]["condition"] == "service_healthy", name
        assert services[name]["healthcheck"]["test"], name
    assert {p["target"] for p in services["nginx"]["ports"]} == {50051}
    # The health agent shares nginx's process namespace (to reload it) and the volume with the replica list.
    agent, nginx = services["lb-agent"], services["nginx"]
    assert agent["pid"] == "service:nginx"
    assert agent["depends_on"]["server"]["condition"] == "service_healthy"
    shared = {v["source"] for v in agent["volumes"] if v["type"] == "volume"}
    assert shared and shared <= {v["source"] for v in nginx["volumes"] if v["type"] == "volume"}
    command = " ".join(agent["command"])
    assert "--replicas=server:50051" in command and "--nginx-pid-file=/run/nlpserve-lb/nginx.pid" in command
    assert "pid /run/nlpserve-lb/nginx.pid;" in (ROOT / "deploy/nginx/nginx.conf").read_text()
    assert "NLPSERVE_DRAIN_DELAY_SECONDS" in server["environment"]
    # The files the stack mounts are the ones the tests check.
    mounts = {v["source"] for s in services.values() for v in s.get("volumes", []) if v["type"] == "bind"}
    for path in (
        "deploy/nginx/nginx.conf",
        "deploy/nginx/health_agent.py",
        "deploy/prometheus",
        "deploy/grafana/provisioning",
        "deploy/grafana/dashboards",
    ):
        assert str(ROOT / path) in mounts, path


def test_cpu_variant_drops_the_gpu(docker_compose):
    server = merged(docker_compose, CPU_FILES)["services"]["server"]
    assert not server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert server["command"] == ["--device", "cpu"]
    assert server["environment"]["NLPSERVE_VARIANT"] == "int8"


def test_models_dir_is_configurable(docker_compose, tmp_path: Path):
    env_file = tmp_path / "env"
    env_file.write_text(f"NLPSERVE_MODELS_DIR={tmp_path}\n")
    result = docker_compose("--env-file", str(env_file), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    volumes = json.loads(result.stdout)["services"]["server"]["volumes"]
    assert any(v["source"] == str(tmp_path) and v["target"] == "/models" for v in volumes)


def test_grafana_has_no_default_password_nor_anonymous_viewers(docker_compose):
    grafana = merged(docker_compose, GPU_FILES)["services"]["grafana"]
    env = grafana["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env  # a value would show in `docker inspect`
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana-admin-password"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert [s["source"] for s in grafana["secrets"]] == ["grafana-admin-password"]


def test_tls_overlay_turns_tls_and_keys_on_from_secret_files(docker_compose):
    services = merged(docker_compose, TLS_FILES)["services"]
    env = services["server"]["environment"]
    assert env["NLPSERVE_TLS_CERT"].startswith("/run/secrets/")
    assert env["NLPSERVE_TLS_KEY"].startswith("/run/secrets/")
    assert env["NLPSERVE_API_KEYS_FILE"].startswith("/run/secrets/")
    assert not any("KEYS=" in str(v) for v in env.values())  # keys come from a file, never a value
    assert "--tls-ca=/run/secrets/nlpserve-tls-ca" in services["lb-agent"]["command"]
    mounts = {v["source"] for v in services["nginx"]["volumes"] if v["type"] == "bind"}
    assert str(ROOT / "deploy/nginx/nginx-tls.conf") in mounts
