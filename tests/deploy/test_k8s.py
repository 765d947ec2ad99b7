"""The Kubernetes manifests, validated offline against the Kubernetes API schemas (kubernetes-validate, strict:
unknown fields fail), and checked for what they promise: gRPC health probes, a GPU per replica, an HPA on a
metric that the prometheus-adapter rules actually serve."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from .conftest import DEPLOY, venv_tool

K8S = DEPLOY / "k8s"
# The oldest Kubernetes release still supported upstream that these manifests target (gRPC probes are GA
# since 1.27).
KUBERNETES_VERSION = "1.33.0"


def manifests() -> list[Path]:
    """The plain Kubernetes resources, those `kubectl apply -k deploy/k8s` applies."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / name for name in kustomization["resources"]]


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources() -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for p in manifests() for d in documents(p)}


def validate(*paths: Path) -> subprocess.CompletedProcess:
    tool = venv_tool("kubernetes-validate")
    return subprocess.run(
        [str(tool), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_manifest_is_listed():
    listed = set(manifests())
    assert listed == set(K8S.glob("*.yaml")) - {
        K8S / "kustomization.yaml",
        K8S / "prometheus-adapter-values.yaml",
    }


def test_manifests_validate_against_the_kubernetes_schemas():
    result = validate(*manifests())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # kubernetes-validate only warns about a kind it has no schema for: every resource must really pass.
    for name, resource in resources().items():
        assert f"passed for resource {resource['kind'].lower()}/{resource['metadata']['name']}" in output, (
            name
        )
    assert "WARN" not in output and "Couldn't find schema" not in output, output


def test_the_validator_rejects_a_wrong_manifest(tmp_path: Path):
    deployment = documents(K8S / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service_name"] = "x"
    broken = tmp_path / "deployment.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    result = validate(broken)
    assert result.returncode != 0, result.stdout


def test_deployment_probes_gpu_and_drain():
    all_resources = resources()
    pod = all_resources["Deployment/nlpserve"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "metrics": 8000, "http": 8080}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == ports["grpc"], probe
        assert "service" not in server[probe]["grpc"]  # "": the whole server, NOT_SERVING while draining
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--device" in server["args"] and server["args"][server["args"].index("--device") + 1] == "cuda"
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["NLPSERVE_PORT"] == "50051" and env["NLPSERVE_METRICS_PORT"] == "8000"
    assert env["NLPSERVE_HTTP_PORT"] == "8080"
    # Kubernetes waits for the drain: the grace period covers the preStop pause and the server's own grace.
    assert pod["terminationGracePeriodSeconds"] > float(env["NLPSERVE_GRACE_SECONDS"]) + 5
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    services = [r for r in all_resources.values() if r["kind"] == "Service"]
    assert any(s["spec"].get("clusterIP") == "None" for s in services)  # for client-side balancing
    main_service = all_resources["Service/nlpserve"]["spec"]["ports"]
    assert {p["name"]: p["port"] for p in main_service} == {"grpc": 50051, "metrics": 8000, "http": 8080}


def test_hpa_scales_on_a_metric_the_adapter_serves():
    hpa = resources()["HorizontalPodAutoscaler/nlpserve"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "nlpserve"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    assert name in served, f"the HPA asks for {name}; prometheus-adapter serves {sorted(served)}"
    rule = served[name]
    # The adapter maps the series to pods through these labels.
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["seriesQuery"].startswith("nlpserve_queue_depth{")


def test_optional_custom_resources_are_well_formed():
    """The PodMonitor and the KServe InferenceService need CRDs that no offline schema covers: check their
    shape, and that the InferenceService runs the server on the port it declares."""
    monitor = documents(K8S / "optional" / "podmonitor.yaml")[0]
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    isvc = documents(K8S / "optional" / "kserve-inferenceservice.yaml")[0]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    args = container["args"]
    port = int(args[args.index("--port") + 1])
    assert container["ports"] == [{"name": "h2c", "containerPort": port, "protocol": "TCP"}]
    assert args[args.index("--models") + 1] == "/mnt/models"  # where KServe's storage initializer writes
    assert container["readinessProbe"]["grpc"]["port"] == port
