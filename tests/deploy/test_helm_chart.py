"""The Helm chart, rendered and linted by the real Helm engine and checked against Kubernetes' schemas.

helm-python-sdk ships Helm's Go SDK as a shared library (libhelm_c, Helm v4) that it calls through
ctypes: there is no helm binary. It is imported unconditionally, so a missing engine fails the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
    "replicas": {"replicaCount": 3, "secrets": SECRETS},
    "embedded-without-volume": {"persistence": {"enabled": False}},
    "settings": {
        "config": {
            "sliceSeconds": 20,
            "renewalLeadSeconds": 5,
            "warningSeconds": 8,
            "graceSeconds": 45,
            "authorizeTtlSeconds": 30,
            "drainSeconds": 60,
            "flushIntervalSeconds": 0.5,
            "flushBatch": 200,
            "redisPrefix": "billing:",
            "logLevel": "warning",
            "logFormat": "text",
            "maxMessageBytes": 65536,
            "maxConcurrentStreams": 100,
            "platformFreeVoiceMicros": 0,
            "platformFreeSmsMicros": 1000000,
            "platformRates": {"default_voice": 1200000, "sms": {"GB": 400000}},
        }
    },
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


def configmap_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap")["data"]
    return data


def test_defaults_run_one_replica_on_the_embedded_store_on_a_writable_volume() -> None:
    docs = render()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one server per embedded database
    url = configmap_env(docs)["CREDITD_DATABASE_URL"]
    assert url == "sqlite+aiosqlite:////var/lib/creditd/creditd.db"
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in containers(docs)["creditd"]["volumeMounts"] if m["name"] == "data"]
    assert url.endswith(f"{mount['mountPath']}/creditd.db") and not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "data"]
    claim = one(docs, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert pod["securityContext"]["fsGroup"] == 10001  # the volume is writable by creditd's user
    without = render(CASES["embedded-without-volume"])
    assert not of_kind(without, "PersistentVolumeClaim")
    assert {"name": "data", "emptyDir": {}} in one(without, "Deployment")["spec"]["template"]["spec"]["volumes"]


def test_a_shared_database_needs_no_volume_and_rolls() -> None:
    docs = render(CASES["replicas"])
    assert not of_kind(docs, "PersistentVolumeClaim")
    assert "strategy" not in one(docs, "Deployment")["spec"]
    assert "CREDITD_DATABASE_URL" not in configmap_env(docs)
    assert all(m["name"] != "data" for m in containers(docs)["creditd"]["volumeMounts"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, r"replicaCount > 1 needs a shared database"),
        ({"replicaCount": 2, "secrets": {"databaseUrl": SECRETS["databaseUrl"]}}, r"needs secrets\.redisUrl"),
    ],
)
def test_several_replicas_without_shared_stores_fail_to_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_the_grace_period_is_the_drain_plus_a_margin() -> None:
    def grace(values: dict[str, Any]) -> int:
        seconds: int = one(render(values), "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        return seconds

    assert configmap_env(render())["CREDITD_DRAIN_SECONDS"] == "30"
    assert grace({}) == 45
    assert grace({"config": {"drainSeconds": 120}}) == 135
    assert grace({"config": {"drainSeconds": 120}, "shutdownMarginSeconds": 30}) == 150
    assert grace({"terminationGracePeriodSeconds": 600}) == 600


def test_a_pod_disruption_budget_covers_the_pods() -> None:
    docs = render(CASES["replicas"])
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert not of_kind(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")


def test_the_main_settings_become_variables_creditd_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    from creditd.config import from_env

    env = configmap_env(render(CASES["settings"]))
    assert env["CREDITD_SLICE_SECONDS"] == "20" and env["CREDITD_REDIS_PREFIX"] == "billing:"
    for name in [n for n in os.environ if n.startswith("CREDITD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = from_env()  # every variable is a setting, every value valid
    assert (settings.slice_seconds, settings.drain_seconds, settings.log_format) == (20, 60.0, "text")
    assert settings.platform_rates.default_voice == 1_200_000 and settings.platform_rates.sms == {"GB": 400_000}
    assert settings.platform_free_voice_micros == 0 and settings.flush_batch == 200


def test_the_worker_gets_its_token_in_the_variable_the_client_reads() -> None:
    from creditd_client._base import address_and_key

    worker = containers(render(CASES["sidecar"]))["voice-worker"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["CREDITD_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "voice-worker-creditd-key", "key": "api-key"}
    assert "CREDITD_API_KEY" not in env
    seen = {"CREDITD_ADDRESS": env["CREDITD_ADDRESS"]["value"], "CREDITD_TOKEN": "cdk_from_the_secret"}
    assert address_and_key(None, None, seen) == ("127.0.0.1:50051", "cdk_from_the_secret")


def test_a_pod_of_the_default_chart_starts(tmp_path: Path) -> None:
    """creditd serve with the environment of a default pod (its data volume here a folder)."""
    docs = render({"persistence": {"mountPath": str(tmp_path)}, "config": {"listen": "127.0.0.1:0"}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITD_", "OTEL_"))}
    env.update(configmap_env(docs), HOME=str(tmp_path / "home-is-read-only-in-the-pod"))
    process = subprocess.Popen(
        [sys.executable, "-m", "creditd.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        assert any("listening on 127.0.0.1:" in line for line in lines), "".join(lines)
        assert (tmp_path / "creditd.db").exists()
        assert not (tmp_path / "home-is-read-only-in-the-pod").exists()
    finally:
        process.terminate()
        process.wait(30)
