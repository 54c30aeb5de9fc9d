"""Optional direct mode: patch a Deployment's scale subresource with the official
`kubernetes` client (`pip install 'aro-jax[k8s]'`). Off by default: the supported path
is to publish `aro_desired_replicas` and let KEDA or an HPA own the scale. Direct mode
refuses to run when a HorizontalPodAutoscaler targets the Deployment (KEDA creates one
for every ScaledObject), since two controllers writing replicas fight each other.
"""

from __future__ import annotations


class ScalerRefused(RuntimeError):
    """Direct mode would fight another controller, or the target does not exist."""


class KubernetesScaler:
    """Actuator writing `spec.replicas` of apps/v1 Deployment `namespace/deployment`.
    `apps_api` / `autoscaling_api` are `kubernetes.client.AppsV1Api()` /
    `AutoscalingV2Api()` (or objects with the same methods, for tests)."""

    def __init__(self, namespace: str, deployment: str, apps_api=None, autoscaling_api=None):
        if apps_api is None or autoscaling_api is None:
            try:
                from kubernetes import client, config
            except ImportError as e:
                raise ScalerRefused("direct mode needs the kubernetes client: pip install 'aro-jax[k8s]'") from e
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            apps_api, autoscaling_api = client.AppsV1Api(), client.AutoscalingV2Api()
        self.namespace, self.deployment = namespace, deployment
        self.apps, self.autoscaling = apps_api, autoscaling_api
        self.check_no_autoscaler()

    def owning_autoscalers(self) -> list[str]:
        """Names of the HPAs in the namespace whose scaleTargetRef is this Deployment."""
        hpas = self.autoscaling.list_namespaced_horizontal_pod_autoscaler(self.namespace)
        out = []
        for hpa in getattr(hpas, "items", None) or []:
            ref = hpa.spec.scale_target_ref
            if ref.name == self.deployment and ref.kind == "Deployment":
                out.append(hpa.metadata.name)
        return out

    def check_no_autoscaler(self) -> None:
        owners = self.owning_autoscalers()
        if owners:
            raise ScalerRefused(
                f"HorizontalPodAutoscaler {', '.join(owners)} owns deployment {self.namespace}/{self.deployment}; "
                "direct mode would fight it. Let it apply aro_desired_replicas (deploy/k8s/keda-scaledobject.yaml) instead"
            )

    def apply(self, desired) -> None:
        """Set spec.replicas (checked against HPAs again first: one may have appeared)."""
        self.check_no_autoscaler()
        self.apps.patch_namespaced_deployment_scale(self.deployment, self.namespace, {"spec": {"replicas": int(round(desired.replicas))}})
