"""Cluster infrastructure under infra/: manifests parse, use real field names, agree with each other
and with pyproject.toml, reference only Secrets that have templates, and the working_dir that
`ray job submit --working-dir .` uploads stays small.

KubeRay field names are those of the ray.io/v1 API types in KubeRay v1.7.0
(ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go); the cluster-launcher YAML is validated
with the JSON schema and the checks Ray itself runs for `ray up`.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PLACEHOLDER = "CHANGE-ME"

# ray.io/v1 (KubeRay v1.7.0) field names.
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "ingressOptions", "resources",
                     "labels", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas",
                       "idleTimeoutSeconds", "priority", "resources", "labels", "rayStartParams",
                       "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext",
                             "idleTimeoutSeconds", "upscalingMode", "version", "env", "envFrom",
                             "volumeMounts", "command", "args"}
AUTH_OPTIONS_FIELDS = {"enableK8sTokenAuth", "secretName", "mode"}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes", "suspend",
}
OBJECT_STORE_SCHEMES = {"s3", "gs", "gcs", "abfs", "az"}


# --------------------------------------------------------------------------- helpers


def _yaml_files() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


def _documents() -> list[tuple[Path, Any]]:
    return [(path, doc) for path in _yaml_files()
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


DOCS = _documents()


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in DOCS if isinstance(d, dict) and d.get("kind") == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in _of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """``name==version`` dependencies of pyproject.toml, names normalised."""
    pins = {}
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s,;]+)\s*", dep)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def _dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", path.read_text(), flags=re.MULTILINE))


def _ray_cluster_specs() -> Iterator[tuple[str, dict]]:
    for path, doc in _of_kind("RayCluster"):
        yield f"{path.name}:{doc['metadata']['name']}", doc["spec"]
    for path, doc in _of_kind("RayJob"):
        yield f"{path.name}:{doc['metadata']['name']}.rayClusterSpec", doc["spec"]["rayClusterSpec"]


RAY_CLUSTER_SPECS = list(_ray_cluster_specs())


def _groups(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _secret_templates() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _of_kind("Secret")}


def _option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _host_allowed(patterns: list[str], host: str) -> bool:
    """MLflow 3.17's Host-header rule: '*' alone allows all; a pattern with '*' is a glob,
    anything else must equal the Host header (which carries the port when not default)."""
    return "*" in patterns or any(
        fnmatch.fnmatchcase(host, p) if "*" in p else host == p for p in patterns)


# --------------------------------------------------------------------------- all YAML


def test_every_infra_yaml_parses_and_names_its_objects():
    assert _yaml_files(), "no YAML under infra/"
    kinds = {d.get("kind") for _, d in DOCS if isinstance(d, dict)}
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "Secret"} <= kinds
    for path, doc in DOCS:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        if "apiVersion" in doc:
            assert doc.get("kind"), f"{path}: document without kind"
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without a name"


def test_env_values_and_ray_start_params_are_strings():
    """Kubernetes rejects non-string env values; KubeRay's rayStartParams is map[string]string."""
    for path, doc in DOCS:
        for node in _walk(doc):
            if "name" in node and "value" in node and set(node) <= {"name", "value"}:
                assert isinstance(node["value"], str), f"{path}: env {node['name']} is not a string"
            for value in (node.get("rayStartParams") or {}).values():
                assert isinstance(value, str), f"{path}: rayStartParams value {value!r}"


def test_secret_references_have_templates_with_placeholder_values():
    secrets = _secret_templates()
    referenced = set()
    for path, doc in DOCS:
        for node in _walk(doc):
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                assert ref["name"] in secrets, f"{path}: Secret {ref['name']} has no template"
                assert ref["key"] in secrets[ref["name"]].get("stringData", {}), (
                    f"{path}: key {ref['key']} not in Secret {ref['name']}")
                referenced.add(ref["name"])
            if "secretRef" in node:
                assert node["secretRef"]["name"] in secrets, f"{path}: {node['secretRef']} has no template"
                referenced.add(node["secretRef"]["name"])
    for _, spec in RAY_CLUSTER_SPECS:
        name = spec["authOptions"]["secretName"]
        assert "auth_token" in secrets[name]["stringData"]
        referenced.add(name)
    assert referenced == set(secrets), f"unused Secret templates: {set(secrets) - referenced}"
    for name, secret in secrets.items():
        assert "data" not in secret, f"Secret {name}: templates use readable stringData only"
        for key, value in secret["stringData"].items():
            if re.search(r"password|secret|token|access_key", key, re.IGNORECASE):
                assert PLACEHOLDER in str(value), f"Secret {name}.{key} is not a placeholder"


# --------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests_use_v1_field_names():
    assert RAY_CLUSTER_SPECS
    for where, spec in RAY_CLUSTER_SPECS:
        assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"{where}: {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_FIELDS
        assert set(spec.get("authOptions", {})) <= AUTH_OPTIONS_FIELDS
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_FIELDS, f"{where}: {set(group) - WORKER_GROUP_FIELDS}"
    for _, doc in [*_of_kind("RayCluster"), *_of_kind("RayJob")]:
        assert doc["apiVersion"] == "ray.io/v1"
    for _, job in _of_kind("RayJob"):
        assert set(job["spec"]) <= RAYJOB_SPEC_FIELDS, set(job["spec"]) - RAYJOB_SPEC_FIELDS


@pytest.mark.parametrize("where,spec", RAY_CLUSTER_SPECS, ids=[w for w, _ in RAY_CLUSTER_SPECS])
def test_ray_cluster_spec(where, spec):
    assert spec["rayVersion"] == _pins()["ray"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    images = set()
    gpu_groups = []
    for name, group in _groups(spec):
        assert isinstance(group["rayStartParams"], dict), f"{where}/{name}: rayStartParams required"
        pod = group["template"]["spec"]
        shm = [v for v in pod.get("volumes", [])
               if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, f"{where}/{name}: no memory-backed emptyDir volume"
        container = pod["containers"][0]
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in {v["name"] for v in shm}
                   for m in container["volumeMounts"]), f"{where}/{name}: /dev/shm not from memory"
        images.add(container["image"])
        limits = container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(limits), f"{where}/{name}: cpu/memory limits"
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]
        storage = env["TOKENFLOW_STORAGE"]["value"]
        assert urlsplit(storage).scheme in OBJECT_STORE_SCHEMES, f"{where}/{name}: {storage}"
        assert any("secretRef" in ref for ref in container["envFrom"]), "object-store credentials"
        if name == "head":
            ports = {p["containerPort"] for p in container["ports"]}
            assert {6379, 8265, 10001} <= ports
            continue
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1
        gpus = limits.get("nvidia.com/gpu", 0)
        if gpus:
            assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus, \
                "extended resources need requests == limits"
            gpu_groups.append(name)
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    assert len(images) == 1, f"{where}: Ray containers use different images {images}"
    assert not images.pop().endswith(":latest")


RAYJOBS = _of_kind("RayJob")


@pytest.mark.parametrize("path,job", RAYJOBS, ids=[j["metadata"]["name"] for _, j in RAYJOBS])
def test_rayjob_entrypoint_runs_the_pipeline_dag(path, job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in {"python", "python3"} and argv[1] == "pipelines/full.py", argv
    assert (REPO / argv[1]).is_file(), f"{path}: {argv[1]} does not exist"


@pytest.mark.parametrize("path,job", RAYJOBS, ids=[j["metadata"]["name"] for _, j in RAYJOBS])
def test_rayjob_entrypoint_config_exists(path, job):
    config = _option(shlex.split(job["spec"]["entrypoint"]), "--config")
    assert config.startswith("configs/pipelines/"), config
    assert (REPO / config).is_file(), f"{path}: entrypoint config {config} does not exist"


def test_rayjob_runtime_env_and_cleanup():
    dockerfile_workdir = re.search(r"^WORKDIR\s+(\S+)", (INFRA / "docker" / "Dockerfile").read_text(),
                                   flags=re.MULTILINE).group(1)
    assert RAYJOBS
    for _, job in RAYJOBS:
        spec = job["spec"]
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == dockerfile_workdir, "working_dir is the image's code"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0


# --------------------------------------------------------------------------- MLflow server


def test_mlflow_server_deployment():
    """basic auth, Postgres backend store, S3 artifact destination proxied; every secret from a
    Secret (env or a mounted file), none on the command line."""
    deployment = _one("Deployment", "tokenflow-mlflow")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    assert _option(args, "--app-name") == "basic-auth"
    assert _option(args, "--host") == "0.0.0.0"
    assert "--serve-artifacts" in args
    assert not re.search(r"password|secret|postgresql://|\$\(", " ".join(args), re.IGNORECASE), args
    env = {e["name"]: e for e in container["env"]}
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert backend.startswith("postgresql://") and ":$(" not in backend.split("@")[0], "no password in the URI"
    for var in re.findall(r"\$\((\w+)\)", backend):
        assert list(env).index(var) < list(env).index("MLFLOW_BACKEND_STORE_URI"), f"$({var}) defined first"
    postgres = _one("Service", env["MLFLOW_DB_HOST"]["value"])
    assert f":{postgres['spec']['ports'][0]['port']}/" in backend
    assert urlsplit(env["MLFLOW_ARTIFACTS_DESTINATION"]["value"]).scheme in OBJECT_STORE_SCHEMES
    for var in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[var]["valueFrom"], var
    auth_file = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if auth_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    auth = _secret_templates()[volume["secret"]["secretName"]]["stringData"]["basic_auth.ini"]
    assert "default_permission = NO_PERMISSIONS" in auth and "postgresql://" in auth and ":" not in \
        auth.split("postgresql://")[1].split("@")[0], "the auth store's URI has no password either"
    assert container["image"].endswith(":" + _pins()["mlflow"])
    assert any("secretRef" in ref for ref in container["envFrom"]), "artifact-store credentials"


def test_network_policies_let_only_the_ray_pods_reach_mlflow_and_only_mlflow_reach_postgres():
    policies = {d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: d
                for _, d in _of_kind("NetworkPolicy")}
    ray_labels = RAY_CLUSTER_SPECS[0][1]["headGroupSpec"]["template"]["metadata"]["labels"]
    for target, source_labels in (("tokenflow-mlflow", ray_labels),
                                  ("tokenflow-mlflow-postgres",
                                   _one("Deployment", "tokenflow-mlflow")["spec"]["template"]["metadata"]["labels"])):
        policy = policies[target]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}, "pods of this namespace only, no ipBlock"
        assert peer["podSelector"]["matchLabels"].items() <= source_labels.items(), target
        service = _one("Service", target)
        assert [p["port"] for p in rule["ports"]] == [service["spec"]["ports"][0]["port"]]
    for where, spec in RAY_CLUSTER_SPECS:  # every Ray pod carries the label the policy admits
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            labels = group["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "tokenflow", where


def test_ray_pods_log_to_mlflow_as_a_user_from_a_secret():
    for where, spec in RAY_CLUSTER_SPECS:
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
            for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "tokenflow-mlflow-client", (where, var)


def test_mlflow_tracking_uri_reaches_the_server():
    """The Ray pods' tracking URI names the MLflow Service and port, and the server's
    --allowed-hosts accepts that Host header (plus port-forwarded localhost)."""
    uri = _secret_templates()["tokenflow-mlflow-client"]["stringData"]["tracking-uri"]
    parts = urlsplit(uri)
    service = _one("Service", parts.hostname)
    assert parts.port == service["spec"]["ports"][0]["port"]
    container = _one("Deployment", parts.hostname)["spec"]["template"]["spec"]["containers"][0]
    allowed = [h.strip() for h in _option(container["args"], "--allowed-hosts").split(",")]
    for host in (parts.netloc, f"{parts.hostname}.tokenflow.svc.cluster.local:{parts.port}",
                 f"localhost:{parts.port}"):
        assert _host_allowed(allowed, host), host
    assert not _host_allowed(allowed, "attacker.example.com")


def test_services_select_pods_and_ports():
    workloads = [d for _, d in [*_of_kind("Deployment"), *_of_kind("StatefulSet")]]
    for _, service in _of_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)}"
        workload = matches[0]
        assert workload["spec"]["selector"]["matchLabels"].items() <= \
            workload["spec"]["template"]["metadata"]["labels"].items()
        ports = {p.get("name") for c in workload["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])} | {
                p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
    statefulset = _one("StatefulSet", "tokenflow-mlflow-postgres")
    assert statefulset["spec"]["serviceName"] == "tokenflow-mlflow-postgres"
    assert statefulset["spec"]["volumeClaimTemplates"]


# --------------------------------------------------------------------------- images


def test_ray_image_pins_match_pyproject():
    dockerfile = INFRA / "docker" / "Dockerfile"
    text = dockerfile.read_text()
    args = _dockerfile_args(dockerfile)
    pins = _pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert pins["s3fs"] == pins["fsspec"], "s3fs is released in lockstep with fsspec"
    assert "project']['dependencies']" in text, "the image installs pyproject's pinned dependencies"
    base = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-(cu\d+)", args["BASE_IMAGE"])
    assert base, args["BASE_IMAGE"]
    assert base.group(1) == pins["ray"]
    from packaging.specifiers import SpecifierSet

    assert f"{base.group(2)}.{base.group(3)}" in SpecifierSet(_pyproject()["project"]["requires-python"])
    assert base.group(4) == args["TORCH_CUDA"], "torch's CUDA build matches the base image's CUDA"
    assert f"ray.__version__ == '{pins['ray']}'" in text
    assert re.search(r"^ENV DS_BUILD_OPS=0", text, flags=re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}, "the image runs as a non-root user"
    assert re.search(r"^WORKDIR\s+/home/ray/", text, flags=re.MULTILINE)
    for line in re.findall(r"^(?:ENV|ARG)\s+(.*)$", text, flags=re.MULTILINE):
        assert not re.search(r"AWS_SECRET|AWS_ACCESS|PASSWORD|AUTH_TOKEN|MLFLOW_TRACKING_URI", line), line


def test_mlflow_image_pins_match_pyproject():
    dockerfile = INFRA / "mlflow" / "Dockerfile"
    args = _dockerfile_args(dockerfile)
    assert args["MLFLOW_VERSION"] == _pins()["mlflow"]
    text = dockerfile.read_text()
    assert "psycopg2" in text and "mlflow[auth]" in text
    assert args["BOTO3_VERSION"] == _pins()["boto3"]
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}


# --------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config_is_valid_for_ray_up():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster-launcher" / "tokenflow-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)
    validate_config(prepare_config(config))  # what `ray up` does before launching anything

    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    workers = {k: v for k, v in nodes.items() if k != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
    # Same image as the Kubernetes manifests (registry aside).
    kube_image = RAY_CLUSTER_SPECS[0][1]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert config["docker"]["image"].split("/", 1)[1] == kube_image.split("/", 1)[1]
    # The node environment file is mounted and loaded; its template has the variables we need.
    (remote, _local), = config["file_mounts"].items()
    assert any(remote.removeprefix("~/") in cmd for cmd in config["setup_commands"])
    env_example = (INFRA / "cluster-launcher" / "cluster.env.example").read_text()
    keys = dict(re.findall(r"^([A-Z_]+)=(.*)$", env_example, flags=re.MULTILINE))
    assert {"TOKENFLOW_STORAGE", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN"} <= set(keys)
    assert urlsplit(keys["TOKENFLOW_STORAGE"]).scheme in OBJECT_STORE_SCHEMES
    assert keys["RAY_AUTH_TOKEN"] == PLACEHOLDER


def test_cluster_launcher_iam_is_least_privilege_and_ssh_is_not_open_to_the_world():
    config = yaml.safe_load((INFRA / "cluster-launcher" / "tokenflow-gpu.yaml").read_text())
    aws = INFRA / "cluster-launcher" / "aws"
    storage = urlsplit(dict(re.findall(r"^([A-Z_]+)=(.*)$", (INFRA / "cluster-launcher" / "cluster.env.example")
                                       .read_text(), flags=re.MULTILINE))["TOKENFLOW_STORAGE"])
    for name, node in config["available_node_types"].items():
        profile = node["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
        role = "head" if name == config["head_node_type"] else "worker"
        assert profile == f"tokenflow-ray-{role}", name  # without one, Ray creates a role with *FullAccess
        assert node["node_config"]["SecurityGroupIds"], f"{name}: Ray's default group opens SSH to 0.0.0.0/0"
        policy = json.loads((aws / f"{role}-policy.json").read_text())
        for statement in policy["Statement"]:
            actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
            resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
            assert statement["Effect"] == "Allow" and not any(a.endswith(":*") or a == "*" for a in actions)
            for action in actions:
                if action.startswith("s3:"):
                    assert all(r.startswith(f"arn:aws:s3:::{storage.netloc}") for r in resources), statement
                    if action != "s3:ListBucket":
                        assert all(r.endswith(storage.path + "/*") for r in resources), statement
            if "s3:ListBucket" in actions:
                assert statement["Condition"]["StringLike"]["s3:prefix"]
        if role == "worker":
            assert not any(a.startswith(("ec2:", "iam:")) for s in policy["Statement"]
                           for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
    assert "FullAccess" not in "".join(p.read_text() for p in (INFRA / "cluster-launcher").rglob("*") if p.is_file())
    rules = json.loads((aws / "security-group.json").read_text())["IpPermissions"]
    open_ranges = [r for rule in rules for r in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", [])
                   if r.get("CidrIp") == "0.0.0.0/0" or r.get("CidrIpv6") == "::/0"]
    assert not open_ranges
    (ssh,) = [rule for rule in rules if rule.get("FromPort") == 22]
    assert all(PLACEHOLDER in r["CidrIp"] for r in ssh["IpRanges"])


def test_deploy_guide_names_the_objects_the_manifests_create():
    guide = (REPO / "docs" / "deploy.md").read_text()
    for _, cluster in _of_kind("RayCluster"):
        assert f"svc/{cluster['metadata']['name']}-head-svc" in guide  # KubeRay's head Service name
    for _, job in RAYJOBS:
        assert f"rayjob {job['metadata']['name']}" in guide
        assert " ".join(shlex.split(job["spec"]["entrypoint"])) in guide
    for name in _secret_templates():
        assert f"create secret generic {name}" in guide, name
    for path in _yaml_files():
        assert path.relative_to(REPO).as_posix().rsplit("/", 1)[0] in guide, path


# --------------------------------------------------------------------------- working_dir upload


def _uploaded_files(root: Path, include_gitignore: bool, excludes: list[str]) -> list[Path]:
    """The files Ray 2.60 zips for a working_dir (its own traversal and ignore-file logic)."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    files: list[Path] = []
    packaging._dir_travel(root, [packaging._get_excludes(root, excludes)],
                          lambda p: files.append(p) if p.is_file() else None,
                          include_gitignore=include_gitignore)
    return files


def test_rayignore_alone_excludes_heavy_paths(tmp_path):
    """Even with .gitignore and Ray's default excludes switched off, .rayignore keeps
    environments, data, outputs, tracking stores and weights out of the upload."""
    (tmp_path / ".rayignore").write_text((REPO / ".rayignore").read_text())
    heavy = [".venv/lib/torch.so", ".git/objects/pack.pack", "data/shard-000.tar",
             "outputs/run/tokens.parquet", "mlruns/0/meta.yaml", "tokenflow/__pycache__/x.pyc",
             "weights/tokenizer.safetensors", "benchmarks/results/geneval.json", "mlflow.db",
             "tokenflow.egg-info/PKG-INFO", ".env"]
    kept = ["tokenflow/__init__.py", "pipelines/full.py", "configs/pipelines/smoke.yaml",
            "pyproject.toml", "infra/cluster-launcher/cluster.env.example"]
    for rel in heavy + kept:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    files = {p.relative_to(tmp_path).as_posix()
             for p in _uploaded_files(tmp_path, include_gitignore=False, excludes=[])}
    assert files == set(kept) | {".rayignore"}


def test_working_dir_upload_stays_small():
    from ray._private.ray_constants import get_runtime_env_default_excludes

    files = _uploaded_files(REPO, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    rel = {p.relative_to(REPO).as_posix() for p in files}
    for top in (".git", ".venv", "data", "outputs", "mlruns"):
        assert not any(r == top or r.startswith(top + "/") for r in rel), top
    for needed in ("pyproject.toml", "tokenflow/__init__.py", "tokenflow/config.py",
                   "configs/deepspeed/zero3-bf16.yaml", "configs/pipelines/smoke.yaml"):
        assert needed in rel, f"{needed} would not be uploaded"
    total = sum(p.stat().st_size for p in files)
    assert total < 10 * 2**20, f"working_dir upload is {total / 2**20:.1f} MiB"
