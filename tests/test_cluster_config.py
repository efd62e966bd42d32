"""The cluster files as the tools that run them read them: every KubeRay manifest against
the openAPIV3Schema of its KubeRay v1.7.0 CRD (unknown fields refused, as a structural schema
prunes them), ray-cluster.yaml through Ray's own cluster-config validation, and the security
settings every one of them must keep (token auth on, pinned images)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO.parent / "shared" / "spec" / "kuberay-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _closed(schema: dict) -> dict:
    """The schema with additionalProperties false wherever it lists properties and does not
    say it keeps unknown fields: a misspelled field fails instead of vanishing."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, list):
                stack.extend(v for v in value if isinstance(v, dict))
    return schema


def _crd_schema(kind: str) -> dict:
    path = CRDS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"{path} is not here: the KubeRay CRDs come with the shared spec")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _closed(version["schema"]["openAPIV3Schema"])


def _kuberay_manifests() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted((REPO / "cluster").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("apiVersion") == "ray.io/v1":
                out.append((path, document))
    return out


def _cluster_specs(document: dict) -> list[dict]:
    """The RayCluster specs a manifest holds, at whatever depth its kind puts them."""
    spec = document["spec"]
    if document["kind"] == "RayCluster":
        return [spec]
    if document["kind"] == "RayJob":
        return [spec["rayClusterSpec"]]
    return [spec["jobTemplate"]["rayClusterSpec"]]


def test_every_kind_is_present():
    kinds = {d["kind"] for _, d in _kuberay_manifests()}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= kinds


@pytest.mark.parametrize("path_document", _kuberay_manifests(),
                         ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}")
def test_kuberay_manifest_matches_its_crd(path_document):
    path, document = path_document
    schema = _crd_schema(document["kind"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=str)
    assert not errors, f"{path.name}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


@pytest.mark.parametrize("path_document", _kuberay_manifests(),
                         ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}")
def test_kuberay_clusters_keep_token_auth_and_pinned_images(path_document):
    path, document = path_document
    for spec in _cluster_specs(document):
        assert spec["authOptions"]["mode"] == "token", path.name
        assert re.match(r"2\.\d+", spec["rayVersion"])
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                assert container["image"] == f"csmn:{VERSION}", (path.name, container["image"])
                names = {e["name"] for e in container.get("env", [])}
                assert "RAY_AUTH_MODE" not in names or all(
                    e.get("value") != "disabled" for e in container["env"])


def test_the_crd_check_catches_a_misspelled_field():
    path, document = next((p, d) for p, d in _kuberay_manifests() if d["kind"] == "RayCluster")
    broken = copy.deepcopy(document)
    broken["spec"]["authOption"] = broken["spec"].pop("authOptions")
    validator = jsonschema.Draft7Validator(_crd_schema("RayCluster"))
    assert any("authOption" in e.message for e in validator.iter_errors(broken))


def test_ray_cluster_launcher_config_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    # what `ray up` does before it starts anything: defaults filled in, then the schema
    validate_config(prepare_config(copy.deepcopy(config)))
    nodes = config["available_node_types"]
    # every node, workers included, gets an instance profile: workers read s3:// too
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())
    assert any(n["max_workers"] > n["min_workers"] == 0 for n in nodes.values())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    launches = [c for c in starts if "ray start" in c]
    assert launches and all("RAY_AUTH_MODE=token" in c for c in launches)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert config["docker"]["image"] == f"csmn:{VERSION}"
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_dockerfile_pins_and_installs_the_system_packages():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest")
    for package in ("libenchant-2-2", "hunspell-en-us", "default-jre-headless"):
        assert package in text
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all("==" in p for p in pins)


def test_no_cluster_file_turns_auth_off():
    for path in [REPO / "ray-cluster.yaml", REPO / "Dockerfile", *(REPO / "cluster").glob("*")]:
        assert "RAY_AUTH_MODE=disabled" not in path.read_text(), path.name


def test_ray_validation_catches_a_misspelled_field():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")
    with pytest.raises(Exception, match="idle_timeout_minute"):
        validate_config(prepare_config(config))


def _kubernetes_manifests() -> list[tuple[Path, dict]]:
    """The plain Kubernetes objects of cluster/ (everything that is not ray.io)."""
    out = []
    for path in sorted((REPO / "cluster").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "apiVersion" in document and not str(
                    document["apiVersion"]).startswith("ray.io/"):
                out.append((path, document))
    return out


KUBERNETES_VERSION = "1.33"


def test_plain_kubernetes_objects_validate():
    import kubernetes_validate

    manifests = _kubernetes_manifests()
    assert {d["kind"] for _, d in manifests} >= {"CronJob"}
    for _, document in manifests:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    # the older operators' nightly job: ray job submit with token auth, never overlapping
    cron = next(d for _, d in manifests if d["kind"] == "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["ray", "job", "submit"]
    assert "jobs/generate.py" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in str(env["RAY_AUTH_TOKEN"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert container["image"] == f"csmn:{VERSION}"


def test_every_service_account_the_pods_name_is_in_the_cluster_files():
    """A pod that names a missing ServiceAccount is never created."""
    defined = {d["metadata"]["name"] for _, d in _kubernetes_manifests()
               if d["kind"] == "ServiceAccount"}
    def names(node: object) -> set[str]:
        if isinstance(node, dict):
            own = {node["serviceAccountName"]} if "serviceAccountName" in node else set()
            return own.union(*(names(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(names(v) for v in node))
        return set()

    named = set().union(*(names(d) for path in sorted((REPO / "cluster").glob("*.yaml"))
                          for d in yaml.safe_load_all(path.read_text())))
    assert named and named <= defined, (named, defined)


def test_the_heads_that_listen_beyond_loopback_take_traffic_from_their_namespace_only():
    """KubeRay's heads bind every address (their Service needs it): a NetworkPolicy keeps other
    namespaces' pods away from them (KubeRay labels every head pod ray.io/node-type: head)."""
    wide = [path.name for path, d in _kuberay_manifests() for spec in _cluster_specs(d)
            if spec["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host") != "127.0.0.1"]
    assert wide
    policy = next(d for _, d in _kubernetes_manifests() if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/node-type": "head"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own_namespace, operator = policy["spec"]["ingress"]
    assert own_namespace == {"from": [{"podSelector": {}}]}
    # ... and the operator, from its own namespace, to the dashboard it polls jobs through
    assert operator["from"] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]


def test_kubernetes_validation_catches_a_misspelled_field():
    import kubernetes_validate

    document = next(d for _, d in _kubernetes_manifests() if d["kind"] == "CronJob")
    broken = copy.deepcopy(document)
    broken["spec"]["schedual"] = broken["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_nightly_raycronjob_runs_the_generate_job():
    (document,) = [d for _, d in _kuberay_manifests() if d["kind"] == "RayCronJob"]
    assert document["spec"]["schedule"] and document["spec"]["timeZone"]
    template = document["spec"]["jobTemplate"]
    assert template["entrypoint"].startswith("python jobs/generate.py")
    assert template["shutdownAfterJobFinishes"] is True


def _gpus_at_most(spec: dict) -> int:
    """GPUs the cluster can have: each worker group's maxReplicas x its pods' GPUs."""
    total = 0
    for group in spec.get("workerGroupSpecs", []):
        for container in group["template"]["spec"]["containers"]:
            gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            total += gpus * int(group.get("maxReplicas", group.get("replicas", 0)))
    return total


def _gpus_needed(entrypoint: str) -> int:
    """GPUs a job's actors or workers ask for (one each), from its own argument parser."""
    import shlex

    from csmn.config import config_from_args

    argv = shlex.split(entrypoint)
    script = Path(argv[1]).stem
    if script == "generate":
        from csmn.pipeline.generate import GenerateConfig, build_parser
        config = config_from_args(GenerateConfig, build_parser().parse_args(argv[2:]))
        return (config.feature_actors + config.decode_actors) if config.use_gpu else 0
    if script == "train":
        from csmn.pipeline.train import TrainConfig, build_parser
        config = config_from_args(TrainConfig, build_parser().parse_args(argv[2:]))
        return config.workers if config.use_gpu else 0
    raise AssertionError(f"no GPU count known for {entrypoint!r}")


def test_jobs_ask_for_no_more_gpus_than_their_clusters_can_have():
    """Ray Data's actor pools and Ray Train's worker group wait for all of their GPUs: a
    job asking for more than its cluster can scale to never starts its work."""
    checked = 0
    for _, document in _kuberay_manifests():
        if document["kind"] == "RayJob":
            template = document["spec"]
        elif document["kind"] == "RayCronJob":
            template = document["spec"]["jobTemplate"]
        else:
            continue
        needed = _gpus_needed(template["entrypoint"])
        assert needed <= _gpus_at_most(template["rayClusterSpec"]), template["entrypoint"]
        checked += needed > 0
    assert checked == 2  # the training RayJob and the nightly RayCronJob
