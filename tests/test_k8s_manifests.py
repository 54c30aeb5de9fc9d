"""The Kubernetes manifests under aro_jax/deploy/k8s: each parses, has the fields its API
requires, and agrees with the others and with what the agent publishes."""

from pathlib import Path

import pytest
import yaml

import aro_jax.deploy

K8S = Path(aro_jax.deploy.__file__).parent / "k8s"


def docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name, kind):
    found = [d for d in docs(name) if d["kind"] == kind]
    assert len(found) == 1, (name, kind)
    return found[0]


def require(doc, *paths):
    for path in paths:
        node = doc
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{doc['kind']} lacks {path}"
            node = node[part]


def agent_args():
    container = one("agent.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"] if a.startswith("--"))


def test_every_manifest_parses_with_api_version_kind_and_name():
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"keda-scaledobject.yaml", "hpa-external.yaml", "agent.yaml", "prometheus-adapter-rules.yaml"}
    for f in files:
        for d in docs(f.name):
            require(d, "apiVersion", "kind", "metadata.name")


def test_keda_scaled_object():
    so = one("keda-scaledobject.yaml", "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    require(so, "spec.scaleTargetRef.name", "spec.minReplicaCount", "spec.maxReplicaCount", "spec.fallback.failureThreshold", "spec.fallback.replicas", "spec.triggers")
    spec = so["spec"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    assert spec["fallback"]["failureThreshold"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"  # KEDA supports fallback only for AverageValue metrics
    meta = trigger["metadata"]
    require(trigger, "metadata.serverAddress", "metadata.query", "metadata.threshold")
    assert float(meta["threshold"]) == 1.0  # desired = ceil(value / 1) = the agent's number
    args = agent_args()
    assert meta["query"] == f'max(aro_desired_replicas{{namespace="{args["namespace"]}",deployment="{args["deployment"]}"}})'
    assert spec["scaleTargetRef"]["name"] == args["deployment"] and so["metadata"]["namespace"] == args["namespace"]


def test_hpa_alternative():
    hpa = one("hpa-external.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    require(hpa, "spec.scaleTargetRef.name", "spec.minReplicas", "spec.maxReplicas", "spec.metrics")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "aro_desired_replicas"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    so = one("keda-scaledobject.yaml", "ScaledObject")
    assert hpa["spec"]["scaleTargetRef"] == so["spec"]["scaleTargetRef"]
    rules = yaml.safe_load(one("prometheus-adapter-rules.yaml", "ConfigMap")["data"]["config.yaml"])
    assert rules["externalRules"][0]["name"]["as"] == "aro_desired_replicas"


def test_agent_deployment_service_and_service_monitor():
    dep, svc, mon = one("agent.yaml", "Deployment"), one("agent.yaml", "Service"), one("agent.yaml", "ServiceMonitor")
    require(dep, "spec.selector.matchLabels", "spec.template.metadata.labels", "spec.template.spec.containers")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= port_names and mon["spec"]["endpoints"][0]["path"] == "/metrics"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert int(agent_args()["http"]) == container["ports"][0]["containerPort"]


def test_agent_args_are_accepted_by_the_cli():
    import argparse

    from aro_jax.deploy.runner import add_agent_arguments

    p = argparse.ArgumentParser()
    add_agent_arguments(p)
    container = one("agent.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "agent"
    ns = p.parse_args(container["args"][1:])
    assert ns.prometheus and ns.selector and ns.host == "0.0.0.0" and not ns.direct


@pytest.mark.parametrize("name", ["keda-scaledobject.yaml", "hpa-external.yaml", "agent.yaml"])
def test_published_metric_names_exist(name):
    """Every aro_* metric a manifest refers to is one the control loop publishes."""
    import re

    from aro_jax.deploy.agent import Telemetry
    from aro_jax.deploy.control_loop import LoopMetrics

    t = Telemetry()
    LoopMetrics(t, "llm", "vllm")
    published = {m.name for m in t.registry.collect()}
    for ref in set(re.findall(r"aro_[a-z_]+", (K8S / name).read_text())) - {"aro_agent", "aro_policy"}:
        if ref.startswith(("aro_desired", "aro_agent_")):
            assert ref in published, ref
