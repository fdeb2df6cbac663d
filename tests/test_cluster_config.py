"""The AWS deployment configuration: cluster/*.yaml, serve_config.cluster.yaml, cluster/README.md.

Offline: no AWS call is made. Ray's own validators check the files; the instance-type lookup
that `ray up` does against EC2 is replaced by a table of the few types the config uses, so the
CPU/GPU counts Ray would fill in are known and placement of every deployment can be checked.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

# Ray's own validation of a cluster YAML, as `ray up` runs it. Ray exposes no public function for it
# (the CLI only validates on the way to calling AWS), so the private module is imported on purpose:
# a test that re-implemented the schema would drift from the Ray version we pin.
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"
CLUSTER_YAMLS = sorted(p for p in CLUSTER_DIR.glob("*.y*ml"))
SERVE_CONFIG = ROOT / "serve_config.cluster.yaml"
README = CLUSTER_DIR / "README.md"

# Ray's control-plane ports: dashboard / Jobs API, Ray Client, GCS. Never reachable from outside.
FORBIDDEN_PORTS = {8265, 10001, 6379}
SERVE_PORT = 8000
ANYWHERE = {"0.0.0.0/0", "::/0"}

# What EC2 DescribeInstanceTypes says about the types we use (vCPUs, MiB, GPUs).
INSTANCE_TYPES: dict[str, dict[str, Any]] = {
    "m5.xlarge": {"vcpus": 4, "mib": 16384},
    "m5.2xlarge": {"vcpus": 8, "mib": 32768},
    "m5.4xlarge": {"vcpus": 16, "mib": 65536},
    "c6i.2xlarge": {"vcpus": 8, "mib": 16384},
    "g4dn.xlarge": {"vcpus": 4, "mib": 16384, "gpu": ("T4", 1)},
    "g4dn.2xlarge": {"vcpus": 8, "mib": 32768, "gpu": ("T4", 1)},
    "g5.xlarge": {"vcpus": 4, "mib": 16384, "gpu": ("A10G", 1)},
    "g5.2xlarge": {"vcpus": 8, "mib": 32768, "gpu": ("A10G", 1)},
    "g6.xlarge": {"vcpus": 4, "mib": 16384, "gpu": ("L4", 1)},
}
GPU_FAMILIES = ("g4dn.", "g5.", "g6.")

# The cluster config is sharded (searcher.shards: 2): one Searcher deployment per shard.
SEARCHERS = ("Searcher_0", "Searcher_1")
EXPECTED_PLACEMENT = {"Embedder": "gpu_worker", **dict.fromkeys(SEARCHERS, "cpu_worker"), "Ingress": "cpu_worker"}


def _fake_describe_instance_types(region: str, aws_credentials: Any = None) -> list[dict[str, Any]]:
    out = []
    for name, spec in INSTANCE_TYPES.items():
        entry: dict[str, Any] = {
            "InstanceType": name,
            "VCpuInfo": {"DefaultVCpus": spec["vcpus"]},
            "MemoryInfo": {"SizeInMiB": spec["mib"]},
        }
        if "gpu" in spec:
            gpu_name, count = spec["gpu"]
            entry["GpuInfo"] = {"Gpus": [{"Name": gpu_name, "Manufacturer": "NVIDIA", "Count": count}]}
        out.append(entry)
    return out


def _load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def _filled_out(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The config as `ray up` sees it before any provider call that needs AWS: defaults merged,
    then node resources auto-detected from the instance type, then validated."""
    from ray.autoscaler._private.aws import node_provider

    monkeypatch.setattr(node_provider, "list_ec2_instances", _fake_describe_instance_types)
    prepared = prepare_config(copy.deepcopy(config))
    for node_type in prepared["available_node_types"].values():
        assert node_type["node_config"]["InstanceType"] in INSTANCE_TYPES, (
            "add the instance type's vCPUs/memory/GPUs to INSTANCE_TYPES in this test"
        )
    filled = node_provider.AWSNodeProvider.fillout_available_node_types_resources(prepared)
    validate_config(filled)
    return filled


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return _load(SERVE_CONFIG)


@pytest.fixture(scope="module")
def deployments(serve_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (app,) = serve_config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def test_there_is_an_aws_cluster_yaml() -> None:
    assert CLUSTER_DIR / "aws.yaml" in CLUSTER_YAMLS


# --------------------------------------------------------------------------------------------
# Ray's own validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validator(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _load(path)
    validate_config(copy.deepcopy(raw))  # the file as written
    filled = _filled_out(raw, monkeypatch)  # and after Ray's defaults and resource detection
    assert filled["provider"]["type"] == "aws"


def test_serve_config_passes_serves_schema(serve_config: dict[str, Any]) -> None:
    from ray.serve.config import AutoscalingConfig, BackpressureConfig
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    assert {d.name for d in app.deployments} == set(EXPECTED_PLACEMENT)
    for d in app.deployments:
        # ServeDeploySchema keeps these as plain dicts: validate them with their own models too.
        raw = next(x for x in serve_config["applications"][0]["deployments"] if x["name"] == d.name)
        if "autoscaling_config" in raw:
            AutoscalingConfig(**raw["autoscaling_config"])
        if "backpressure_config" in raw:
            BackpressureConfig(**raw["backpressure_config"])


# --------------------------------------------------------------------------------------------
# Placement: node-type resources vs. what serve_config.cluster.yaml asks for
# --------------------------------------------------------------------------------------------


def _replica_demand(deployment: dict[str, Any]) -> dict[str, float]:
    opts = deployment.get("ray_actor_options", {})
    demand: dict[str, float] = {"CPU": float(opts.get("num_cpus", 1))}
    if opts.get("num_gpus"):
        demand["GPU"] = float(opts["num_gpus"])
    for name, amount in (opts.get("resources") or {}).items():
        demand[name] = float(amount)
    return demand


def _fits(demand: dict[str, float], supply: dict[str, float]) -> bool:
    return all(supply.get(k, 0) >= v for k, v in demand.items() if v > 0)


def _replicas_per_node(demand: dict[str, float], supply: dict[str, float]) -> int:
    return int(min(supply.get(k, 0) // v for k, v in demand.items() if v > 0))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_deployment_has_exactly_its_node_type(
    path: Path, deployments: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    filled = _filled_out(_load(path), monkeypatch)
    node_types = filled["available_node_types"]
    for name, deployment in deployments.items():
        demand = _replica_demand(deployment)
        hosts = [t for t, spec in node_types.items() if _fits(demand, spec["resources"])]
        assert hosts == [EXPECTED_PLACEMENT[name]], f"{name} {demand} could be placed on {hosts}"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_autoscaling_bounds_fit_the_node_type_bounds(
    path: Path, deployments: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """min_replicas fit on min_workers nodes (the service starts without waiting for the
    autoscaler) and max_replicas fit on max_workers nodes (scale-out never pends forever)."""
    filled = _filled_out(_load(path), monkeypatch)
    node_types = filled["available_node_types"]
    for bound, workers_key in (("min_replicas", "min_workers"), ("max_replicas", "max_workers")):
        per_type: dict[str, dict[str, float]] = {}
        for name, deployment in deployments.items():
            auto = deployment.get("autoscaling_config") or {}
            count = auto.get(bound, deployment.get("num_replicas", 1))
            node_type = EXPECTED_PLACEMENT[name]
            for k, v in _replica_demand(deployment).items():
                per_type.setdefault(node_type, {}).setdefault(k, 0.0)
                per_type[node_type][k] += v * count
        for node_type, need in per_type.items():
            spec = node_types[node_type]
            have = {k: v * spec[workers_key] for k, v in spec["resources"].items()}
            assert _fits(need, have), f"{bound}: {node_type} x{spec[workers_key]} has {have}, needs {need}"
    total_max = sum(t["max_workers"] for t in _worker_types(filled).values())
    assert filled["max_workers"] >= total_max


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_gpu_worker_type(path: Path, deployments: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _load(path)
    filled = _filled_out(raw, monkeypatch)
    gpu = filled["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    assert gpu["resources"].get("GPU", 0) >= 1
    assert gpu["resources"].get("gpu_worker") == 1
    assert "gpu_worker" in deployments["Embedder"]["ray_actor_options"]["resources"]
    assert deployments["Embedder"]["ray_actor_options"]["num_gpus"] == 1
    assert gpu["max_workers"] > gpu["min_workers"], "the autoscaler must be able to add embedders"
    # The GPU node runs the CUDA image; the others the CPU image.
    gpu_image = raw["available_node_types"]["gpu_worker"]["docker"]["worker_image"]
    assert gpu_image != raw["docker"]["image"]
    assert "--gpus all" in raw["available_node_types"]["gpu_worker"]["docker"]["worker_run_options"]


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_custom_resources_are_integers_one_per_node(path: Path) -> None:
    """The scheme the local emulation relies on: every node type advertises exactly one marker
    resource with value 1 (`ray start --resources='{"cpu_worker": 1}'` stands for a node)."""
    raw = _load(path)
    markers = {}
    for name, spec in raw["available_node_types"].items():
        custom = {k: v for k, v in spec["resources"].items() if k not in ("CPU", "GPU", "memory")}
        assert len(custom) == 1 and list(custom.values()) == [1], f"{name}: {custom}"
        markers[name] = next(iter(custom))
    assert markers == {"head": "head_node", "cpu_worker": "cpu_worker", "gpu_worker": "gpu_worker"}
    assert raw["available_node_types"][raw["head_node_type"]]["resources"]["CPU"] == 0


# --------------------------------------------------------------------------------------------
# Security properties of the cluster YAML
# --------------------------------------------------------------------------------------------


def _rule_ports(rule: dict[str, Any]) -> set[int] | None:
    """Ports a security-group rule opens; None means all ports."""
    if str(rule.get("IpProtocol")) == "-1":
        return None
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if lo in (-1, None) or hi in (-1, None):
        return None
    return set(range(int(lo), int(hi) + 1))


def _rule_cidrs(rule: dict[str, Any]) -> set[str]:
    return {r["CidrIp"] for r in rule.get("IpRanges", [])} | {r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_node_type_uses_our_security_group(path: Path) -> None:
    """With SecurityGroupIds on every node type Ray creates no group of its own (its default
    group admits SSH from 0.0.0.0/0 and cannot be narrowed afterwards)."""
    raw = _load(path)
    for name, spec in raw["available_node_types"].items():
        groups = spec["node_config"].get("SecurityGroupIds")
        assert groups and all(isinstance(g, str) and g.startswith("sg-") for g in groups), name
        assert "NetworkInterfaces" not in spec["node_config"], name


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_security_group_rules_in_the_yaml_if_any_are_safe(path: Path) -> None:
    rules = _load(path)["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ports = _rule_ports(rule)
        from_outside = bool(_rule_cidrs(rule))
        if from_outside:
            assert ports is not None, f"all ports open to {_rule_cidrs(rule)}"
            assert not ports & FORBIDDEN_PORTS, rule
            if 22 in ports:
                assert not _rule_cidrs(rule) & ANYWHERE, "SSH from anywhere"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_node_type_has_its_own_instance_profile(path: Path) -> None:
    raw = _load(path)
    head_type = raw["head_node_type"]
    head_profile = raw["available_node_types"][head_type]["node_config"].get("IamInstanceProfile")
    assert head_profile, "without one Ray creates its default head role (EC2 + S3 full access)"
    for name, spec in _worker_types(raw).items():
        profile = spec["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name} has no instance profile"
        assert profile != head_profile, f"{name} must not carry the head's autoscaler rights"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_control_plane_stays_private_and_token_auth_stays_on(path: Path) -> None:
    raw = _load(path)
    head_cmds = " ".join(raw["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_cmds), head_cmds
    everything = yaml.safe_dump(raw)
    assert "0.0.0.0/0" not in everything and "::/0" not in everything
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*disabled", everything)
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c for c in cmds)
    assert any("RAY_AUTH_MODE=token" in o for o in raw["docker"]["run_options"])
    assert "~/.ray/auth_token" in raw["file_mounts"]
    for name, spec in raw["available_node_types"].items():
        assert spec["node_config"].get("MetadataOptions", {}).get("HttpTokens") == "required", name


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_node_pulls_the_project_image(path: Path) -> None:
    raw = _load(path)
    images = [raw["docker"]["image"]] + [
        spec.get("docker", {}).get("worker_image") for spec in raw["available_node_types"].values()
    ]
    for image in filter(None, images):
        assert ".dkr.ecr." in image and "/imgsearch:" in image, image
    assert any("ecr get-login-password" in c for c in raw["initialization_commands"])


# --------------------------------------------------------------------------------------------
# serve_config.cluster.yaml: overload behaviour and HTTP
# --------------------------------------------------------------------------------------------


def test_http_options(serve_config: dict[str, Any]) -> None:
    http = serve_config["http_options"]
    assert http["host"] == "0.0.0.0"
    assert http["port"] == SERVE_PORT
    assert 0 < http["request_timeout_s"] < 60, "below the load balancer's idle timeout"
    assert http["keep_alive_timeout_s"] > 60, "above the load balancer's idle timeout"


def test_overload_is_bounded(deployments: dict[str, dict[str, Any]]) -> None:
    for name, d in deployments.items():
        assert d["max_queued_requests"] > 0, f"{name}: unbounded queue"
        # Overrides replace the code's dicts whole: CPU share must be explicit everywhere.
        assert "num_cpus" in d["ray_actor_options"], name
        auto = d.get("autoscaling_config")
        if auto:
            assert d["max_ongoing_requests"] >= auto["target_ongoing_requests"], name
    assert deployments["Ingress"]["backpressure_config"]["status_code"] == 503
    for name in ("Embedder", *SEARCHERS):
        assert deployments[name].get("autoscaling_config"), name
    embedder = deployments["Embedder"]
    assert embedder["max_ongoing_requests"] >= embedder["user_config"]["max_batch_size"]
    for name in SEARCHERS:  # a replica lost never leaves a shard unserved
        assert deployments[name]["autoscaling_config"]["min_replicas"] >= 2, name


def test_every_shard_has_its_deployment_entry(serve_config: dict[str, Any]) -> None:
    """searcher.shards names the Searcher deployments (serve_app.app.searcher_names): each one sized
    and placed here, none left to the code's defaults (no cpu_worker resource), and no stale `Searcher`."""
    from serve_app.app import searcher_names
    from serve_app.config import AppArgs

    (app,) = serve_config["applications"]
    shards = AppArgs.model_validate(app["args"]).searcher.shards
    named = [d["name"] for d in app["deployments"] if d["name"].startswith("Searcher")]
    assert shards == 2 and named == searcher_names(shards) == list(SEARCHERS)


# --------------------------------------------------------------------------------------------
# cluster/README.md: the security group and IAM policies it tells the operator to create
# --------------------------------------------------------------------------------------------


def _readme() -> str:
    return README.read_text()


def _sg_ingress_commands(text: str) -> list[dict[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line.startswith("aws ec2 authorize-security-group-ingress"):
            continue
        args = shlex.split(line.split("#", 1)[0])
        opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        out.append(opts)
    return out


def test_readme_cluster_security_group_rules() -> None:
    rules = [r for r in _sg_ingress_commands(_readme()) if r["--group-id"] == "$CLUSTER_SG"]
    assert rules, "README must create the cluster security group's rules"
    seen_ports = set()
    for r in rules:
        if r["--protocol"] == "-1":
            assert r.get("--source-group") == "$CLUSTER_SG", f"all ports open to {r}"
            assert "--cidr" not in r
            continue
        port = int(r["--port"])
        seen_ports.add(port)
        assert port not in FORBIDDEN_PORTS, r
        assert port in (22, SERVE_PORT), r
        if port == 22:
            assert r["--cidr"] == "$OPERATOR_CIDR", r
        if port == SERVE_PORT:
            assert r.get("--source-group") == "$ALB_SG" or r.get("--cidr") not in ANYWHERE
    assert seen_ports == {22, SERVE_PORT}


def test_readme_operator_cidr_default_is_not_anywhere() -> None:
    m = re.search(r"^export OPERATOR_CIDR=(\S+)", _readme(), re.M)
    assert m, "README must set OPERATOR_CIDR"
    net = ipaddress.ip_network(m.group(1), strict=False)
    assert net.prefixlen >= 16, f"SSH range {net} is too wide"


def _readme_policies() -> dict[str, dict[str, Any]]:
    substitutions = {
        "${BUCKET}": "example-bucket",
        "${AWS_REGION}": "us-west-2",
        "${ACCOUNT_ID}": "123456789012",
        "${CLUSTER_SG}": "sg-0123456789abcdef0",
    }
    policies = {}
    for name, body in re.findall(r"cat > /tmp/(imgsearch-[\w-]+)\.json <<EOF\n(.*?)\nEOF", _readme(), re.S):
        for k, v in substitutions.items():
            body = body.replace(k, v)
        assert "${" not in body, f"{name}: unknown variable"
        policies[name] = json.loads(body)
    return policies


def _statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    st = policy["Statement"]
    return st if isinstance(st, list) else [st]


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def test_readme_policies_are_least_privilege() -> None:
    policies = _readme_policies()
    assert {
        "imgsearch-trust",
        "imgsearch-serve-read",
        "imgsearch-index-write",
        "imgsearch-ecr-pull",
        "imgsearch-head-autoscaler",
    } <= set(policies)
    for name, policy in policies.items():
        for st in _statements(policy):
            assert st["Effect"] == "Allow"
            for action in _as_list(st["Action"]):
                assert "*" not in action, f"{name}: wildcard action {action}"
            if any(a.startswith("s3:") for a in _as_list(st["Action"])):
                for res in _as_list(st["Resource"]):
                    assert res.startswith("arn:aws:s3:::example-bucket"), f"{name}: {res}"


def test_readme_s3_writes_only_under_the_index_prefix() -> None:
    write_actions = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    for name, policy in _readme_policies().items():
        for st in _statements(policy):
            if set(_as_list(st["Action"])) & write_actions:
                assert name == "imgsearch-index-write", f"{name} may write to S3"
                for res in _as_list(st["Resource"]):
                    assert res == "arn:aws:s3:::example-bucket/imgsearch/index/*", res


def test_readme_serving_policy_is_read_only() -> None:
    policy = _readme_policies()["imgsearch-serve-read"]
    actions = {a for st in _statements(policy) for a in _as_list(st["Action"])}
    assert actions == {"s3:GetObject", "s3:ListBucket"}


def test_readme_head_passes_only_the_worker_role() -> None:
    policy = _readme_policies()["imgsearch-head-autoscaler"]
    for st in _statements(policy):
        actions = _as_list(st["Action"])
        if "iam:PassRole" in actions:
            assert _as_list(st["Resource"]) == ["arn:aws:iam::123456789012:role/imgsearch-ray-worker"]
        if "ec2:TerminateInstances" in actions:
            assert st["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == "imgsearch"
    cluster_name = _load(CLUSTER_DIR / "aws.yaml")["cluster_name"]
    assert cluster_name == "imgsearch", "the head policy's tag conditions name the cluster"


def test_readme_names_every_placeholder_of_the_yaml() -> None:
    text = _readme()
    for path in [*CLUSTER_YAMLS, SERVE_CONFIG]:
        for token in set(re.findall(r"[\w-]*SET_ME[\w-]*", path.read_text())):
            assert token in text, f"{path.name}: {token} is never explained in cluster/README.md"


@pytest.mark.parametrize("path", [ROOT / "serve_config.yaml", SERVE_CONFIG], ids=lambda p: p.name)
def test_every_serve_config_loads_into_the_app_and_its_batches_are_reachable(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import AppArgs, BatchingConfig, check_batch_fits_concurrency

    config = _load(path)
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    AppArgs.model_validate(app["args"])
    embedder = next(d for d in app["deployments"] if d["name"] == "Embedder")
    batching = BatchingConfig.model_validate(embedder["user_config"])
    check_batch_fits_concurrency(batching.max_batch_size, embedder["max_ongoing_requests"])
