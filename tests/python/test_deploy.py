"""The deployment files, checked: the Kubernetes base renders with `kubectl kustomize` (when
kubectl is installed; the files are validated either way) and every object passes the
Kubernetes 1.32 schema (kubernetes-validate, strict); the probes, ports, grace period and
scrape annotations agree with each other; and the server arguments the Deployment and the
KServe ServingRuntime pass are run for real: the wisp binary starts with them (ports moved to
free ones, the repository path to a real repository) and answers the probes' paths.
"""

import shutil
import subprocess
import time
import urllib.request

import kubernetes_validate
import pytest
import yaml

from conftest import REPO_ROOT, free_port, wisp_bin

BASE = REPO_ROOT / "deploy" / "kubernetes" / "base"
KSERVE = REPO_ROOT / "deploy" / "kserve"
K8S_VERSION = "1.32"


def rendered_base():
    """The base's objects: as kubectl kustomize renders them, or its resources as written."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(BASE)], check=True, capture_output=True, text=True)
        return list(yaml.safe_load_all(out.stdout)), True
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = [yaml.safe_load((BASE / f).read_text()) for f in kustomization["resources"]]
    return docs, False


def by_kind(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def test_the_base_renders_and_passes_the_kubernetes_schema():
    docs, rendered = rendered_base()
    if not rendered:
        print("kubectl not installed: validated the resources as written, not kustomize's rendering")
    assert sorted(d["kind"] for d in docs) == ["Deployment", "HorizontalPodAutoscaler", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    if rendered:
        # The label kustomize adds selects the pods, and the Service selects them too.
        deployment, service = by_kind(docs, "Deployment"), by_kind(docs, "Service")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()


def test_probes_ports_grace_and_scraping_agree():
    docs, _ = rendered_base()
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    exit_timeout = int(next(a for a in container["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > exit_timeout + pre_stop
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    service = by_kind(docs, "Service")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


def test_kserve_manifests_name_each_other():
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    assert runtime["kind"] == "ServingRuntime" and runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["kind"] == "InferenceService" and isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def serve_with(args, repository, tmp_path):
    """Starts wisp with `args` as a manifest gives them: the repository path replaced by a
    real one, each port by a free one (returned by flag), on the loopback address."""
    ports, cmd = {}, [str(wisp_bin())]
    for arg in args:
        if arg.startswith("--model-repository="):
            arg = f"--model-repository={repository}"
        for flag in ("--http-port", "--grpc-port", "--metrics-port"):
            if arg.startswith(flag + "="):
                ports[flag] = free_port()
                arg = f"{flag}={ports[flag]}"
        cmd.append(arg)
    for flag in ("--http-port", "--grpc-port", "--metrics-port"):
        if flag not in ports:
            ports[flag] = free_port()
            cmd.append(f"{flag}={ports[flag]}")
    cmd.append("--http-address=127.0.0.1")
    log = open(tmp_path / "wisp.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), ports


def answers(port, path, deadline_s=60):
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status
        except OSError:
            time.sleep(0.2)
    return None


def small_repository(tmp_path):
    repo = tmp_path / "repository"
    shutil.copytree(REPO_ROOT / "model_repository" / "simple", repo / "simple")
    return repo


@pytest.mark.parametrize("manifest", ["deployment", "servingruntime"])
def test_the_manifests_server_arguments_run(manifest, tmp_path):
    if manifest == "deployment":
        container = by_kind(rendered_base()[0], "Deployment")["spec"]["template"]["spec"]["containers"][0]
        # The image's entrypoint is `wisp serve`; the Deployment's args follow it.
        args = ["serve", *container["args"]]
        probes = [container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]]
    else:
        container = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())["spec"]["containers"][0]
        assert container["command"] == ["wisp"]
        args = container["args"]
        probes = [container["readinessProbe"]["httpGet"]["path"]]
        http = int(next(a for a in args if a.startswith("--http-port=")).split("=")[1])
        assert container["readinessProbe"]["httpGet"]["port"] == http == container["ports"][0]["containerPort"]
    proc, ports = serve_with(args, small_repository(tmp_path), tmp_path)
    try:
        for path in probes:
            assert answers(ports["--http-port"], path) == 200, (tmp_path / "wisp.log").read_text()[-2000:]
        assert answers(ports["--metrics-port"], "/metrics") == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=40) == 0
