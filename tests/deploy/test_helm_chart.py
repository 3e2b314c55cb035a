"""The Helm chart, rendered and linted by the real Helm engine and checked against Kubernetes' schemas.

helm-python-sdk ships Helm's Go SDK as a shared library (libhelm_c, Helm v4) that it calls through
ctypes: there is no helm binary. It is imported unconditionally, so a missing engine fails the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "creditd"
# The chart's kubeVersion floor (native gRPC probes are GA in 1.27) and the newest schemas shipped.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
# CRDs have no schema in kubernetes-validate, so these kinds are not schema-validated;
# their content is asserted in the tests below instead.
NOT_IN_SCHEMAS = {"ServiceMonitor"}
READINESS = "creditd.v1.MeteringService"
SECRETS = {
    "databaseUrl": "postgresql+psycopg://creditd:pg-s3cret@db:5432/creditd",
    "redisUrl": "redis://:redis-s3cret@redis:6379/0",
    "adminToken": "admin-s3cret-token",
}


def sidecar_values(**extra: Any) -> dict[str, Any]:
    values = helm.values_from_yaml((CHART / "values-sidecar.yaml").read_text())
    values.update(extra)
    return values


CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "sidecar": sidecar_values(),
    "sidecar-metrics": sidecar_values(metrics={"enabled": True}),
    "everything": {
        "secrets": SECRETS,
        "migrations": {"enabled": True},
        "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
        "config": {"sliceSeconds": 15, "extraEnv": {"CREDITD_LOG_LEVEL": "debug"}},
    },
    "existing-secret": {"secrets": {"existingSecret": "mine"}, "migrations": {"enabled": True}},
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="creditd", namespace="billing", is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def containers(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in one(docs, kind)["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict(case: str) -> None:
    report = helm.lint(CHART, CASES[case], strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_manifest_is_valid_kubernetes(case: str, version: str) -> None:
    docs = render(CASES[case])
    assert of_kind(docs, "Deployment")
    for doc in docs:
        if doc["kind"] not in NOT_IN_SCHEMAS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_every_container_runs_locked_down_as_non_root(case: str) -> None:
    docs = render(CASES[case])
    for workload in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        mounts_by_volume = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in mounts_by_volume[tmp[0]["name"]], c["name"]
            if c["image"].startswith("creditd:"):
                assert sc["runAsUser"] == 10001
                assert c["resources"]["requests"] and c["resources"]["limits"]


def test_default_uses_native_grpc_probes_and_a_service() -> None:
    docs = render()
    creditd = containers(docs)["creditd"]
    assert creditd["args"] == ["serve"]
    assert creditd["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert creditd["readinessProbe"]["grpc"] == {"port": 50051, "service": READINESS}
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in creditd["ports"]
    assert one(docs, "ConfigMap")["data"]["CREDITD_LISTEN"] == "0.0.0.0:50051"
    ports = one(docs, "Service")["spec"]["ports"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in ports] == [("grpc", 50051, "grpc")]
    assert not of_kind(docs, "Job") and not of_kind(docs, "ServiceMonitor")


def test_sidecar_runs_next_to_the_worker_on_loopback_without_a_service() -> None:
    docs = render(CASES["sidecar"])
    by_name = containers(docs)
    assert list(by_name) == ["voice-worker", "creditd"]
    assert not of_kind(docs, "Service")
    assert one(docs, "ConfigMap")["data"]["CREDITD_LISTEN"] == "127.0.0.1:50051"
    worker_env = {e["name"]: e.get("value") for e in by_name["voice-worker"]["env"]}
    assert worker_env["CREDITD_ADDRESS"] == "127.0.0.1:50051"
    # The kubelet dials the pod IP, which a loopback listener never answers: probe from inside.
    creditd = by_name["creditd"]
    check = ["python", "-m", "creditd.healthcheck", "127.0.0.1:50051"]
    assert creditd["livenessProbe"]["exec"]["command"] == [*check, ""]
    assert creditd["readinessProbe"]["exec"]["command"] == [*check, READINESS]


def test_sidecar_with_metrics_exposes_only_the_metrics_port() -> None:
    docs = render(CASES["sidecar-metrics"])
    ports = one(docs, "Service")["spec"]["ports"]
    assert [(p["name"], p["port"]) for p in ports] == [("metrics", 9464)]


def test_sidecar_needs_a_worker_image() -> None:
    with pytest.raises(helm.HelmError, match=r"sidecar\.worker\.image\.repository"):
        render({"sidecar": {"enabled": True}})


def test_secrets_go_to_the_secret_and_never_to_the_configmap() -> None:
    docs = render(CASES["everything"])
    config = one(docs, "ConfigMap")["data"]
    assert config["CREDITD_SLICE_SECONDS"] == "15" and config["CREDITD_LOG_LEVEL"] == "debug"
    assert not {"CREDITD_DATABASE_URL", "CREDITD_REDIS_URL", "CREDITD_ADMIN_TOKEN"} & set(config)
    assert not any(s in yaml.safe_dump(config) for s in ("s3cret", "postgresql", "redis://"))
    release_secret = next(s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "creditd")
    assert release_secret["stringData"] == {
        "CREDITD_DATABASE_URL": SECRETS["databaseUrl"],
        "CREDITD_REDIS_URL": SECRETS["redisUrl"],
        "CREDITD_ADMIN_TOKEN": SECRETS["adminToken"],
    }
    env_from = containers(docs)["creditd"]["envFrom"]
    assert env_from == [{"configMapRef": {"name": "creditd"}}, {"secretRef": {"name": "creditd"}}]


def test_existing_secret_is_used_instead_of_a_rendered_one() -> None:
    docs = render(CASES["existing-secret"])
    assert not of_kind(docs, "Secret")
    assert {"secretRef": {"name": "mine"}} in containers(docs)["creditd"]["envFrom"]
    assert containers(docs, "Job")["migrate"]["envFrom"] == [{"secretRef": {"name": "mine"}}]


def test_migration_job_only_when_enabled_and_as_a_pre_install_upgrade_hook() -> None:
    assert not of_kind(render(), "Job")
    docs = render(CASES["everything"])
    job = one(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    migrate = containers(docs, "Job")["migrate"]
    assert migrate["args"] == ["migrate"]
    # The release's Secret does not exist yet when the hook runs: the Job has its own hook Secret.
    hook_secret = next(s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "creditd-migrate")
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"
    assert hook_secret["stringData"] == {"CREDITD_DATABASE_URL": SECRETS["databaseUrl"]}
    assert migrate["envFrom"] == [{"secretRef": {"name": "creditd-migrate"}}]
    # A running migration pod must not become an endpoint of the gRPC Service during an upgrade.
    selector = one(docs, "Service")["spec"]["selector"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_migrations_without_a_database_fail_to_render() -> None:
    with pytest.raises(helm.HelmError, match=r"migrations\.enabled needs"):
        render({"migrations": {"enabled": True}})


def test_service_monitor_scrapes_the_metrics_port_when_enabled() -> None:
    docs = render(CASES["everything"])
    assert one(docs, "ConfigMap")["data"]["CREDITD_METRICS_LISTEN"] == "0.0.0.0:9464"
    metrics_port = {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
    assert metrics_port in containers(docs)["creditd"]["ports"]
    service = one(docs, "Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "metrics"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["billing"]
    with pytest.raises(helm.HelmError, match=r"needs metrics\.enabled"):
        render({"metrics": {"serviceMonitor": {"enabled": True}}})
