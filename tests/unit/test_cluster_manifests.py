"""cluster/: the launcher config and KubeRay manifests are valid, runnable and on the pinned Ray.

What would otherwise fail only on a real cluster, checked without one:

- each KubeRay manifest validates against the operator's CRD schema (the served `v1`
  version, from ../shared/kuberay-crds), strictly: an unknown field is an error, as under
  `kubectl apply --validate=strict`, instead of being dropped. The CEL rules
  (`x-kubernetes-validations`) are not evaluated;
- the cluster-launcher config validates against Ray's own schema (what `ray up` checks first);
- one Ray version everywhere, pinned in one place (cluster/versions.env): pyproject.toml's pin
  (`ray[...]==2.60.*`) holds it, the Dockerfile's base image is its RAY_BASE_IMAGE, and every
  `rayVersion`, every image tag and every version in a comment agree;
- every job command (a RayJob's entrypoint, and the commands written in comments) runs a file
  in jobs/, parses with raylm's own CLI parser, loads as a raylm config, and fits its cluster:
  shared storage, a global batch divisible by micro-batch x workers, GPUs for every worker, and
  the memory per GPU that raylm's estimator (`raylm.plan.memory_for_config`, what `raylm plan`
  sizes runs with) gives for each step, within the plan's budget for the GPU type the cluster
  names (the launcher's instance types; a KubeRay GPU group's `raylm/instance-type`);
- a recipe's job (`jobs/run.py --config RECIPE`) loads the recipe and every training stage
  fits the cluster, and no `<placeholder>` reaches any stage from the recipe file: the
  command names each one it needs (a recipe in the image cannot be edited);
- a RayJob's activeDeadlineSeconds leaves a margin over the time `raylm plan` gives its
  training on its cluster, and not so much that a hung run bills for days;
- the image and the pip runtime_env install what pyproject.toml asks for (the same torch pin,
  a CPU torch on a CPU base image), the dependency layer does not depend on the README, and
  .dockerignore hides nothing the Dockerfile copies;
- secure by default: Ray token auth on every cluster (KubeRay `authOptions` with a Secret; the
  launcher's start commands), the dashboard and Jobs API off public interfaces, the serving
  API key from a Secret;
- head and workers get the same S3 settings, and no credential is written into any file.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import tomllib
from dataclasses import replace
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from raylm.config import MODEL_PRESETS, Config, ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
ALL_FILES = sorted(CLUSTER.rglob("*.yaml"))
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"

# GPUs of the instance types the cluster configs use or suggest, and their GPU by the name
# `raylm plan --gpus` takes (raylm.plan.DEVICES): the autoscaler reads the count from AWS, so
# the test needs its own copy to check that a job's workers and their memory fit.
INSTANCE_TYPES = {"g5.12xlarge": (4, "A10G"), "g5.48xlarge": (8, "A10G"), "p4d.24xlarge": (8, "A100-40GB"),
                  "p5.48xlarge": (8, "H100"), "m5.4xlarge": (0, None)}
GPUS_PER_INSTANCE = {itype: gpus for itype, (gpus, _) in INSTANCE_TYPES.items()}
# The pod-template annotation that names the machine a KubeRay GPU group is sized for.
INSTANCE_ANNOTATION = "raylm/instance-type"
TRAINING_STAGES = ("pretrain", "sft", "dpo")
VERSIONS = CLUSTER / "versions.env"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{_rel(path)}: expected YAML mappings"
    return docs


def _walk(node, path=()):
    """Yield (path, mapping) for every mapping in a parsed YAML document."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _ids(paths):
    return [_rel(p) for p in paths]


def test_cluster_layout():
    """The files the README names exist, so the parametrized checks below cannot pass empty."""
    assert LAUNCHER.is_file()
    kinds = {d["kind"] for p in KUBERAY for d in _docs(p)}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds, kinds
    # One purpose per file: one resource each.
    for p in KUBERAY:
        assert len(_docs(p)) == 1, f"{_rel(p)}: one resource per file"


# --------------------------------------------------------------------------- the Ray version


def _ray_pin():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert len(pins) == 1, f"pyproject.toml: expected one ray requirement, found {deps}"
    spec = pins[0].specifier
    assert len(spec) == 1 and next(iter(spec)).operator == "==", f"pyproject.toml: pin ray with ==, not {spec}"
    return spec


def _pins() -> dict[str, str]:
    """cluster/versions.env: KEY=value lines, the one place that pins Ray and the images."""
    pins = {key: "".join(shlex.split(value))  # as the shell reads it: quotes removed
            for key, value in (line.split("=", 1) for line in VERSIONS.read_text().splitlines()
                               if line.strip() and not line.lstrip().startswith("#"))}
    assert {"RAY_VERSION", "RAY_BASE_IMAGE", "RAYLM_IMAGE"} <= set(pins), f"{_rel(VERSIONS)}: {sorted(pins)}"
    return pins


def _ray_version() -> str:
    """The Ray release everything runs: cluster/versions.env's, inside the pyproject pin, and
    the Dockerfile's base image by default."""
    spec, pins = _ray_pin(), _pins()
    version = pins["RAY_VERSION"]
    assert spec.contains(version), f"{_rel(VERSIONS)}: RAY_VERSION={version} is outside pyproject's ray{spec}"
    assert pins["RAY_BASE_IMAGE"].startswith(f"rayproject/ray:{version}"), pins["RAY_BASE_IMAGE"]
    assert pins["RAYLM_IMAGE"].rpartition(":")[2] == version, pins["RAYLM_IMAGE"]
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.findall(r"^ARG RAY_IMAGE=(\S+)", dockerfile, re.M)
    assert base == [pins["RAY_BASE_IMAGE"]], f"Dockerfile: ARG RAY_IMAGE={base}, {_rel(VERSIONS)} pins " \
                                             f"{pins['RAY_BASE_IMAGE']}"
    found = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", dockerfile))
    assert found == {version}, f"Dockerfile names rayproject/ray:{sorted(found)}, {_rel(VERSIONS)} {version}"
    return version


def test_dockerfile_and_readme_follow_the_pyproject_pin():
    version = _ray_version()
    readme = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", (REPO / "README.md").read_text()))
    assert readme <= {version}, f"README.md names rayproject/ray:{sorted(readme)}, the Dockerfile {version}"


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_manifest_runs_the_pinned_ray(path):
    version, spec = _ray_version(), _ray_pin()
    pinned = str(next(iter(spec)).version)  # e.g. "2.60.*"
    bad = []
    for doc in _docs(path):
        for where, node in _walk(doc):
            if "rayVersion" in node and node["rayVersion"] != version:
                bad.append(f"{'.'.join(map(str, where))}.rayVersion={node['rayVersion']!r}")
            for key in ("image", "head_image", "worker_image"):
                image = node.get(key)
                if not isinstance(image, str):
                    continue
                name, _, tag = image.rpartition(":")
                if name.endswith("/raylm") and image != _pins()["RAYLM_IMAGE"]:
                    bad.append(f"{key} {image!r}: {_rel(VERSIONS)} pins {_pins()['RAYLM_IMAGE']}")
                if not name or "/" in tag:
                    bad.append(f"{key} {image!r} has no tag; tag it with the Ray version {version}")
                elif tag != version and not tag.startswith(version + "-"):
                    bad.append(f"{key} {image!r}: the tag must be {version} or start with {version}-")
    text = path.read_text()  # comments too: the build and install commands in the headers
    for tag in re.findall(r"(?:/raylm|rayproject/ray):([\w.\-]+)", text):
        if tag != version and not tag.startswith(version + "-"):
            bad.append(f"image tag {tag!r} in the text")
    for pin in re.findall(r"\bray(?:\[[\w,]*\])?==([\w.*]+)", text):
        if pin != pinned and (pin.endswith("*") or not spec.contains(pin)):
            bad.append(f"ray=={pin} in the text, pyproject pins ray{spec}")
    for cluster in _ray_clusters(path):
        if cluster and "rayVersion" not in cluster:
            bad.append("a Ray cluster spec without rayVersion")
    assert not bad, f"{_rel(path)} is not on Ray {version} (pyproject.toml: ray{spec}):\n  " + "\n  ".join(bad)


# --------------------------------------------------------------------------- KubeRay CRD schemas


def _strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema in which objects with declared fields refuse others.

    The API server prunes unknown fields silently (a misspelt `shutdownAfterJobFinish` would
    just vanish); this makes them errors, as `kubectl apply --validate=strict` does. Maps
    (`additionalProperties`) and `x-kubernetes-preserve-unknown-fields` objects stay open."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out


def _int_format(bits: int):
    def check(value) -> bool:
        return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
    return check


@lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    assert path.is_file(), f"no CRD for kind {kind!r} in {CRD_DIR}"
    crd = yaml.load(path.read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    served = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")]
    assert served, f"{path.name}: no served v1 version"
    # Formats: only the integer widths are checked; others (int-or-string quantities are
    # `anyOf` integer/string, date-time, ...) are left alone, as jsonschema does by default.
    formats = jsonschema.FormatChecker(formats=())
    formats.checks("int32")(_int_format(32))
    formats.checks("int64")(_int_format(64))
    return jsonschema.Draft4Validator(_strict(served[0]["schema"]["openAPIV3Schema"]), format_checker=formats)


@pytest.mark.parametrize("path", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_manifest_matches_crd_schema(path):
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml, ...)")
    for doc in _docs(path):
        assert doc.get("apiVersion") == "ray.io/v1", f"{_rel(path)}: apiVersion must be ray.io/v1"
        errors = sorted(_crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        msgs = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]
        assert not msgs, f"{_rel(path)} ({doc['kind']}) does not match the CRD:\n  " + "\n  ".join(msgs[:10])
        # ObjectMeta is not in the CRD schema; the API server wants a DNS-1123 name, and
        # KubeRay derives service names from it.
        name = doc.get("metadata", {}).get("name", "")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?", name), f"{_rel(path)}: metadata.name {name!r}"


# --------------------------------------------------------------------------- cluster shape


def _ray_clusters(path: Path) -> list[dict]:
    """The RayCluster specs a KubeRay file defines (a RayCluster's spec, a RayJob's rayClusterSpec)."""
    out = []
    for doc in _docs(path):
        if doc.get("kind") == "RayCluster":
            out.append(doc["spec"])
        elif doc.get("kind") in ("RayJob", "RayService"):
            out.append(doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig"))
    return out


def _ray_containers(cluster: dict) -> list[tuple[str, dict]]:
    """(group, container) for the Ray container of the head and of each worker group: KubeRay
    runs Ray in the first container of each pod template."""
    out = [("head", cluster["headGroupSpec"]["template"]["spec"]["containers"][0])]
    for group in cluster.get("workerGroupSpecs", []):
        out.append((group["groupName"], group["template"]["spec"]["containers"][0]))
    return out


def _kuberay_gpu_groups(cluster: dict, where: str) -> list[tuple[int, int, str]]:
    """(pods a job can get, GPUs per pod, GPU type) of each worker group with GPUs: replicas, or
    maxReplicas when the autoscaler runs; the type that of the instance the group's
    `raylm/instance-type` annotation names. A GPU group without one, or asking for more GPUs
    than that machine has, fails."""
    out = []
    for group in cluster.get("workerGroupSpecs", []):
        pods = group["maxReplicas"] if cluster.get("enableInTreeAutoscaling") else group.get("replicas", 0)
        template = group["template"]
        limits = template["spec"]["containers"][0].get("resources", {}).get("limits", {})
        per_pod = int(limits.get("nvidia.com/gpu", 0))
        if not per_pod:
            continue
        itype = template.get("metadata", {}).get("annotations", {}).get(INSTANCE_ANNOTATION)
        assert itype, (f"{where}: GPU group {group['groupName']!r} does not name the machine it is sized for; "
                       f"annotate its pod template with {INSTANCE_ANNOTATION}: <instance type>")
        assert itype in INSTANCE_TYPES, f"{where}: add {itype}'s GPUs to INSTANCE_TYPES"
        gpus, device = INSTANCE_TYPES[itype]
        assert per_pod <= gpus, f"{where}: group {group['groupName']!r} asks for {per_pod} GPUs, {itype} has {gpus}"
        out.append((pods, per_pod, device))
    return out


@pytest.mark.parametrize("path", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_cluster_shape(path):
    """What the operator checks on creation, and the S3 settings every Ray pod needs."""
    for cluster in _ray_clusters(path):
        groups = [g["groupName"] for g in cluster.get("workerGroupSpecs", [])]
        assert len(groups) == len(set(groups)), f"{_rel(path)}: worker group names repeat: {groups}"
        for g in cluster.get("workerGroupSpecs", []):
            lo, n, hi = g["minReplicas"], g.get("replicas", g["minReplicas"]), g["maxReplicas"]
            assert lo <= n <= hi, f"{_rel(path)}: group {g['groupName']}: need minReplicas <= replicas <= maxReplicas"
        # Head and workers all talk to S3 (the driver reads the corpus, workers write checkpoint
        # shards): one missing credential or endpoint shows up only mid-run.
        s3_env = {group: [e for e in c.get("env", []) if e["name"].startswith("AWS_")]
                  for group, c in _ray_containers(cluster)}
        assert s3_env["head"], f"{_rel(path)}: the head has no AWS_* settings"
        for group, env in s3_env.items():
            assert env == s3_env["head"], f"{_rel(path)}: group {group}'s AWS_* env differs from the head's"


def test_rayjob_ends_and_cleans_up():
    """A RayJob on its own cluster that is deleted afterwards, with a deadline and a retry budget."""
    jobs = [(p, d) for p in KUBERAY for d in _docs(p) if d["kind"] == "RayJob"]
    assert jobs
    for path, job in jobs:
        spec = job["spec"]
        assert "rayClusterSpec" in spec and "clusterSelector" not in spec, f"{_rel(path)}: needs its own cluster"
        assert spec.get("shutdownAfterJobFinishes") is True, f"{_rel(path)}: GPUs would outlive the job"
        assert spec.get("activeDeadlineSeconds", 0) > 0, f"{_rel(path)}: no activeDeadlineSeconds"
        assert "backoffLimit" in spec and "backoffLimit" in spec.get("submitterConfig", {}), _rel(path)


def test_launcher_config_matches_ray_schema():
    """What `ray up` validates before touching AWS."""
    config = yaml.safe_load(LAUNCHER.read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, f"{_rel(LAUNCHER)}: missing {key}"
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # without importing ray
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    assert not errors, f"{_rel(LAUNCHER)} does not match Ray's cluster schema:\n  " + "\n  ".join(errors)
    # The further checks of ray.autoscaler._private.util.validate_config.
    types = config["available_node_types"]
    assert config["head_node_type"] in types, f"{_rel(LAUNCHER)}: head_node_type is not a node type"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert config["provider"]["type"] == "aws"
    # raylm's S3 client needs the region inside the container; it must be the cluster's own.
    region = [o for o in config["docker"]["run_options"] if "AWS_REGION=" in o]
    assert region == [f"--env AWS_REGION={config['provider']['region']}"], (
        f"{_rel(LAUNCHER)}: docker.run_options must set AWS_REGION to provider.region, found {region}")


def _launcher_gpu_capacity(config: dict) -> int:
    return sum(nodes * gpus for nodes, gpus, _ in _launcher_gpu_groups(config))


def _launcher_gpu_groups(config: dict) -> list[tuple[int, int, str | None]]:
    """(nodes a job can get, GPUs per node, GPU type) of each worker type; 0 GPUs for CPU ones."""
    out = []
    for name, t in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        itype = t["node_config"]["InstanceType"]
        assert itype in INSTANCE_TYPES, f"{_rel(LAUNCHER)}: add {itype}'s GPUs to INSTANCE_TYPES"
        gpus, device = INSTANCE_TYPES[itype]
        gpus = t.get("resources", {}).get("GPU", gpus)
        out.append((min(t.get("max_workers", config["max_workers"]), config["max_workers"]), gpus, device))
    return out


# --------------------------------------------------------------------------- job commands


def _comment_commands(text: str) -> list[str]:
    """Commands written in comments that run a job: `python ... jobs/*.py`, continuation
    lines joined."""
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not s.startswith("#"):
            cur = ""
            continue
        s = s.lstrip("#").strip()
        cur += s
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        lines.append(cur)
        cur = ""
    return [ln for ln in lines if re.search(r"\bpython[\d.]*\s+\S*jobs/\S+\.py", ln)]


def _job_commands(path: Path) -> list[tuple[str, str]]:
    """(where, command) for each job a file would run: entrypoints and commands in comments."""
    out = [(f"comment in {_rel(path)}", c) for c in _comment_commands(path.read_text())]
    for doc in _docs(path):
        if "entrypoint" in doc.get("spec", {}):
            out.append((f"{_rel(path)} spec.entrypoint", doc["spec"]["entrypoint"]))
    return out


def _job_subcommand(job: Path) -> list[str]:
    """The subcommand a jobs/*.py file hands to raylm.cli.main, read from its source."""
    for node in ast.walk(ast.parse(job.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args
                and isinstance(node.args[0], ast.List)):
            return [e.value for e in node.args[0].elts if isinstance(e, ast.Constant)]
    raise AssertionError(f"{_rel(job)}: no main([...]) call to read the subcommand from")


def _dockerfile_paths() -> tuple[str, str]:
    text = (REPO / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    return workdir.rstrip("/"), text


# Placeholders the headers say to replace (`<bucket>`, `<registry>`, ...).
_PLACEHOLDER = re.compile(r"<([A-Za-z][\w-]*)>")


def _resolve_job(where: str, command: str) -> tuple[Path, list[tuple[str | None, Config]]]:
    """The repository file a job command runs and the config of each stage it would run, as
    (recipe stage, config), the stage None for a single-stage job; fails the test with the
    command when the script is missing or the arguments do not parse. The command's
    `<placeholders>` are replaced first, as its header says to; one still in a config came
    from a file."""
    from raylm.cli import build_parser

    command = _PLACEHOLDER.sub(r"\1", command)
    argv = shlex.split(command, comments=True)
    if "--" in argv:  # `ray job submit ... -- python ...`
        argv = argv[argv.index("--") + 1:]
    assert argv and re.fullmatch(r"python[\d.]*", argv[0]), f"{where}: expected `python jobs/...`: {command}"
    script = argv[1]
    if script.startswith("/"):
        # A path inside the image: it must be where the Dockerfile puts the repository.
        workdir, dockerfile = _dockerfile_paths()
        assert script.startswith(workdir + "/"), f"{where}: {script} is not under the image's WORKDIR {workdir}"
        script = script[len(workdir) + 1:]
        top = script.split("/")[0]
        assert re.search(rf"^COPY\b.*\s{top}/?\s+(\./)?{top}/?\s*$", dockerfile, re.M), (
            f"{where}: the Dockerfile does not copy {top}/ into {workdir}")
    job = REPO / script
    assert script.startswith("jobs/") and job.is_file(), f"{where}: {script} is not a file in jobs/"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args([*_job_subcommand(job), *argv[2:]])
    except SystemExit:
        pytest.fail(f"{where}: raylm's CLI refuses the arguments: {err.getvalue().strip().splitlines()[-1]}")
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    config = args.config
    if args.command == "run" and config and args.recipe:  # as cmd_run: with --config, the first
        overrides.insert(0, args.recipe)                  # positional is an override too
    if config and config.startswith("/"):  # a file inside the image: the repository's copy
        config = str(REPO / config[len(_dockerfile_paths()[0]) + 1:])
    try:
        if args.command == "run":  # a recipe: every stage's config
            return job, _recipe_configs(config or args.recipe, overrides)
        return job, [(None, load_config(config, overrides))]
    except ConfigError as e:
        pytest.fail(f"{where}: {e}")


def _recipe_configs(path: str, overrides: list[str]) -> list[tuple[str | None, Config]]:
    from raylm.recipe import load_recipe, stage_config

    recipe = load_recipe(path, overrides)
    out = []
    for stage in recipe.stages:
        fake = {s: {"path": f"{recipe.root}/{s}", "checkpoint": f"{recipe.root}/{s}", "corpus": ""}
                for s in recipe.inputs_of(stage)}
        out.append((stage.name, stage_config(recipe, stage, fake)))
    assert any(s in TRAINING_STAGES for s, _ in out), f"{path}: a recipe with no training stage"
    return out


def _training(stages: list[tuple[str | None, Config]]) -> list[Config]:
    """The configs of the stages that train; a single-stage job's config counts as one."""
    return [cfg for stage, cfg in stages if stage is None or stage in TRAINING_STAGES]


def _placeholders_left(cfg: Config) -> list[str]:
    """`key=value` of every path or URI in the config that still holds a `<placeholder>`."""
    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        elif isinstance(node, (list, tuple)):
            for v in node:
                yield from walk(v, prefix)
        elif isinstance(node, str) and "/" in node and _PLACEHOLDER.search(node):
            yield f"{prefix.rstrip('.')}={node}"
    return list(walk(to_dict(cfg)))


def _memory_per_gpu(cfg: Config) -> float:
    """Peak bytes on one GPU of a training step of `cfg`, by raylm's estimator for a config
    (raylm.plan.memory_for_config, the memory model `raylm plan` sizes runs with), with the
    config's settings resolved as a CUDA worker resolves them; the stage's own step (SFT's
    document masking, DPO's pairs, full logits and frozen reference) is the estimator's."""
    from raylm.plan import memory_for_config

    return memory_for_config(cfg, "cuda").total


def _check_fits(where: str, cfg: Config, gpus: int, devices: list[str] = ()) -> None:
    """What the config's own validation leaves to the run: checks that would fail it on the
    cluster, minutes or hours in. `devices`: the GPU types the job's workers may get."""
    from raylm.plan import GiB, parse_hardware

    tc = cfg.train
    assert cfg.storage.startswith("s3://"), (
        f"{where}: storage={cfg.storage!r}; every node writes checkpoint shards, so it must be s3://")
    assert not cfg.data.path or cfg.data.path.startswith("s3://"), (
        f"{where}: data.path={cfg.data.path!r} exists only on the machine that submits the job")
    assert tc.global_batch_size % (tc.micro_batch_size * tc.num_workers) == 0, (
        f"{where}: train.global_batch_size={tc.global_batch_size} is not a multiple of "
        f"train.micro_batch_size * train.num_workers = {tc.micro_batch_size} * {tc.num_workers}")
    if not cfg.tokenizer.path:  # the run trains a tokenizer of exactly tokenizer.vocab_size ids
        try:
            cfg.model.with_vocab(cfg.tokenizer.vocab_size)
        except ConfigError as e:
            pytest.fail(f"{where}: {e}")
    if gpus:
        assert tc.use_gpu, f"{where}: the cluster has {gpus} GPUs but train.use_gpu is false"
    if tc.use_gpu:
        assert tc.num_workers <= gpus, f"{where}: train.num_workers={tc.num_workers} needs more GPUs than the {gpus} here"
        need = _memory_per_gpu(cfg)
        for device in devices:
            budget = parse_hardware(device).usable  # what `raylm plan` lets a step fill
            assert need <= budget, (
                f"{where}: {need / GiB:.1f} GiB per GPU by raylm's estimator (train.micro_batch_size="
                f"{tc.micro_batch_size}), over the {budget / GiB:.1f} GiB usable on a {device}; lower the "
                f"micro-batch (`raylm plan --size ... --gpus ...` picks one) or turn on activation checkpointing")


JOB_FILES = [p for p in ALL_FILES if all(d.get("kind") != "RayService" for d in _docs(p))]


def _gpu_groups(path: Path) -> list[tuple[int, int, str | None]]:
    """(nodes or pods, GPUs each, GPU type) of the cluster a file defines."""
    if path == LAUNCHER:
        return _launcher_gpu_groups(yaml.safe_load(path.read_text()))
    (cluster,) = _ray_clusters(path)
    return _kuberay_gpu_groups(cluster, _rel(path))


@pytest.mark.parametrize("path", JOB_FILES, ids=_ids(JOB_FILES))
def test_job_commands_run_real_jobs_that_fit(path):
    commands = _job_commands(path)
    assert commands, f"{_rel(path)}: no job command (an entrypoint, or a `python jobs/...` line in the header)"
    groups = _gpu_groups(path)
    gpus = sum(n * per for n, per, _ in groups)
    devices = sorted({device for _, per, device in groups if per})
    for where, command in commands:
        _, stages = _resolve_job(where, command)
        for stage, cfg in stages:
            left = _placeholders_left(cfg)
            assert not left, (f"{where}: {stage or 'the job'} gets placeholders from the file, not the command: "
                              f"{', '.join(left)}; give them in the command")
        for cfg in _training(stages):
            _check_fits(f"{where} ({cfg.stage} {cfg.name})", cfg, gpus, devices)


def _planned_hours(where: str, configs: list[Config], nodes: int, per_node: int, device: str):
    """(preset, tokens, hours) of the training in `configs` on nodes x per_node `device`s, from `raylm
    plan`: its throughput for the model at this sequence length over the tokens every
    training stage processes (a DPO pair is two sequences)."""
    from raylm.plan import make_plan

    tokens = sum(c.train.max_steps * c.train.global_batch_size * c.data.seq_len * (2 if c.stage == "dpo" else 1)
                 for c in configs)
    shape = replace(configs[0].model, vocab_size=0, max_seq_len=0)
    presets = [name for name, m in MODEL_PRESETS.items() if replace(m, vocab_size=0, max_seq_len=0) == shape]
    assert presets, f"{where}: the model is none of raylm's presets; `raylm plan` sizes presets only"
    plan = make_plan(presets[0], f"{per_node}x{device}", nodes=nodes, train_tokens=tokens,
                     seq_len=configs[0].data.seq_len)
    return presets[0], tokens, plan.hours


def test_rayjob_deadline_leaves_a_margin_over_the_plan():
    """activeDeadlineSeconds against the time `raylm plan` gives the job's training on its
    cluster: at least 1.5x (a lower MFU than the plan's 40%, the data stages, a retry's repeated
    steps), at most 3x (a hung run should not bill for days). The `raylm plan` command its
    comment gives must be the one for this job."""
    from raylm.plan import parse_count

    jobs = [(p, d) for p in KUBERAY for d in _docs(p) if d["kind"] == "RayJob"]
    assert jobs
    for path, job in jobs:
        where = f"{_rel(path)} spec.activeDeadlineSeconds"
        (cluster,) = _ray_clusters(path)
        ((nodes, per_node, device),) = _kuberay_gpu_groups(cluster, _rel(path))
        _, stages = _resolve_job(where, job["spec"]["entrypoint"])
        preset, tokens, hours = _planned_hours(where, _training(stages), nodes, per_node, device)
        deadline = job["spec"]["activeDeadlineSeconds"] / 3600
        assert 1.5 * hours <= deadline <= 3 * hours, (
            f"{where}: {deadline:.0f} h; `raylm plan` gives {hours:.0f} h for {tokens / 1e9:.3g}B tokens on "
            f"{nodes} x {per_node} {device}, so set {1.5 * hours:.0f} to {3 * hours:.0f} h")
        plans = re.findall(r"raylm plan --size (\S+) --gpus (\S+) --nodes (\d+) --train-tokens (\S+)", path.read_text())
        assert plans, f"{where}: its comment gives no `raylm plan ... --train-tokens` command"
        for size, gpus, n, written in plans:
            assert (size, gpus, int(n)) == (preset, f"{per_node}x{device}", nodes), (
                f"{where}: the comment plans --size {size} --gpus {gpus} --nodes {n}")
            assert abs(parse_count(written) / tokens - 1) < 0.01, (
                f"{where}: the comment plans --train-tokens {written}, the job trains {tokens / 1e9:.4g}B")


# --------------------------------------------------------------------------- secrets

_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)
# A literal after an AWS credential variable (not a $reference), or an AWS access key id.
_SECRET_TEXT = re.compile(
    r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN|RAYLM_API_KEY|auth_token)"
    r"\s*[=:]\s*[\"']?[^\s\"'$]"
    r"|\b(AKIA|ASIA)[0-9A-Z]{16}\b"
)


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_no_inline_secrets(path):
    """Credentials come from a Kubernetes Secret or an instance role, never from these files."""
    bad = []
    for doc in _docs(path):
        for where, node in _walk(doc):
            name = node.get("name")
            if isinstance(name, str) and _SECRET_NAME.search(name) and "value" in node:
                bad.append(f"{'.'.join(map(str, where))}: {name} has a literal value; use valueFrom.secretKeyRef")
            if isinstance(name, str) and name.startswith("AWS_") and "valueFrom" in node:
                ref = node["valueFrom"].get("secretKeyRef")
                if _SECRET_NAME.search(name) and not ref:
                    bad.append(f"{'.'.join(map(str, where))}: {name} must come from a secretKeyRef")
    for m in _SECRET_TEXT.finditer(path.read_text()):
        bad.append(f"literal credential in the text: {m.group(0)[:40]!r}")
    assert not bad, f"{_rel(path)}:\n  " + "\n  ".join(bad)


# --------------------------------------------------------------------------- secure by default


@pytest.mark.parametrize("path", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_clusters_use_ray_token_auth(path):
    """Token auth from a Secret on every Ray cluster, and no public route to the dashboard or
    the Jobs API (no LoadBalancer or NodePort head service, no Ingress)."""
    for cluster in _ray_clusters(path):
        auth = cluster.get("authOptions", {})
        assert auth.get("mode") == "token", f"{_rel(path)}: spec authOptions.mode must be token"
        assert auth.get("secretName"), f"{_rel(path)}: the token comes from a Secret (authOptions.secretName)"
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{_rel(path)}: the head's service is public"
        assert head.get("enableIngress") is not True, f"{_rel(path)}: an Ingress would publish the dashboard"
    for doc in _docs(path):
        assert doc["kind"] != "Ingress"


def test_launcher_turns_on_token_auth_and_keeps_the_dashboard_private():
    config = yaml.safe_load(LAUNCHER.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, f"{_rel(LAUNCHER)}: {key} has no `ray start`"
        for c in starts:
            assert "RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c, f"{key}: {c}"
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, head
    # The token reaches every node from the submitter's machine, never from the repository.
    assert any("auth_token" in remote for remote in config["file_mounts"]), config["file_mounts"]
    types = config["available_node_types"]
    cpu_workers = [n for n, t in types.items() if n != config["head_node_type"]
                   and GPUS_PER_INSTANCE.get(t["node_config"]["InstanceType"]) == 0]
    assert cpu_workers and _launcher_gpu_capacity(config) > 0, "CPU workers for Ray Data and GPU workers"
    assert all(types[n]["max_workers"] > types[n].get("min_workers", 0) for n in types if n != config["head_node_type"])


def test_raycluster_has_autoscaled_cpu_and_gpu_groups():
    (cluster,) = _ray_clusters(CLUSTER / "kuberay" / "raycluster.yaml")
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = [n for n, g in groups.items() if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    cpu = [n for n in groups if n not in gpu]
    assert gpu and cpu, groups.keys()
    assert all(groups[n]["maxReplicas"] > groups[n]["minReplicas"] for n in groups)


def _services() -> list[tuple[Path, dict]]:
    return [(p, d) for p in KUBERAY for d in _docs(p) if d["kind"] == "RayService"]


def test_rayservice_serves_raylm_with_a_key_from_a_secret():
    from raylm.config import load_serve_config

    services = _services()
    assert services
    for path, svc in services:
        serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
        (app,) = serve["applications"]
        module, _, attr = app["import_path"].partition(":")
        assert module.startswith("raylm.serve"), f"{_rel(path)}: serves {app['import_path']}, not raylm's app"
        args = app["args"]
        assert set(args) == {"run", "serve"}, args
        cfg = load_serve_config(list(args["serve"].items()))
        assert not cfg.api_key, f"{_rel(path)}: the API key comes from the Secret, not the serve config"
        assert serve["http_options"]["port"] == cfg.port or "port" not in args["serve"]
        # Every Ray container (the app is built on the head, replicas run on workers) gets the
        # key from a Secret, as RAYLM_API_KEY (raylm.serve.app.API_KEY_ENV).
        for group, c in _ray_containers(svc["spec"]["rayClusterConfig"]):
            keys = [e for e in c.get("env", []) if e["name"] == "RAYLM_API_KEY"]
            assert keys and "secretKeyRef" in keys[0]["valueFrom"], f"{_rel(path)}: {group} has no RAYLM_API_KEY Secret"
        try:
            builder = getattr(importlib.import_module(module), attr, None)
        except ImportError as e:
            pytest.skip(f"{module} cannot be imported here ({e})")
        if builder is None:
            pytest.skip(f"{app['import_path']}: raylm.serve has no application builder of that name yet; "
                        f"the RayService needs one taking Serve's `args`")
        assert callable(builder)


def test_serve_key_name_matches_the_app():
    try:
        from raylm.serve.app import API_KEY_ENV
    except ImportError as e:
        pytest.skip(f"raylm.serve.app cannot be imported here ({e})")
    assert API_KEY_ENV == "RAYLM_API_KEY"


# --------------------------------------------------------------------------- image and runtime_env


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def _copy_sources(args: str) -> list[str]:
    parts = [a for a in shlex.split(args) if not a.startswith("--")]
    return [s.rstrip("/") for s in parts[:-1]]


def _pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["export"]]
    return {r.name: r for r in reqs}


def test_dockerfile_dependency_layer_and_torch():
    """The layer that installs torch depends on pyproject.toml alone (a README edit must not
    reinstall it); the working directory is made before WORKDIR (which would make it root's
    under the classic builder, and the build writes into it); a CPU base image gets torch from
    the CPU index (PyPI's Linux x86_64 wheel is the CUDA build) with pyproject's pin."""
    steps = _dockerfile_instructions()
    install = next(i for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install" in args)
    before = [s for word, args in steps[:install] if word == "COPY" for s in _copy_sources(args)]
    assert before == ["pyproject.toml"], f"Dockerfile: the dependency layer copies {before}, only pyproject.toml"
    after = [s for word, args in steps[install:] if word == "COPY" for s in _copy_sources(args)]
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in after, f"Dockerfile: pyproject's readme {readme} is not copied with the code"
    workdir = _dockerfile_paths()[0]
    first_workdir = next(i for i, (word, _) in enumerate(steps) if word == "WORKDIR")
    assert any(word == "RUN" and re.search(rf"mkdir -p {re.escape(workdir)}\b", args)
               for word, args in steps[:first_workdir]), f"Dockerfile: make {workdir} before WORKDIR"
    deps_run = steps[install][1]
    torch = re.findall(r"--index-url \S+ '(torch[^']*)'", deps_run)
    assert torch and "/usr/local/cuda" in deps_run, "Dockerfile: a CPU base image installs torch from the CPU index"
    assert Requirement(torch[0]).specifier == _pyproject_requirements()["torch"].specifier, (
        f"Dockerfile installs {torch[0]}, pyproject.toml asks for {_pyproject_requirements()['torch']}")
    assert "download.pytorch.org/whl/cpu" in (REPO / "Dockerfile").read_text()
    # The in-tree build of the placeholder package leaves build/lib/raylm/__init__.py (empty),
    # newer than the real one COPY brings (it keeps the files' times), so the final install
    # would take the empty one: the layer removes its leftovers.
    assert re.search(r"rm -rf build\b", deps_run), "Dockerfile: the dependency layer must remove build/"


def test_dockerignore_keeps_what_the_dockerfile_copies():
    path = REPO / ".dockerignore"
    if not path.is_file():
        return
    patterns = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for word, args in _dockerfile_instructions():
        if word != "COPY" or "--from" in args:
            continue
        for src in _copy_sources(args):
            parts = src.split("/")
            for prefix in ("/".join(parts[:i]) for i in range(1, len(parts) + 1)):
                hit = [p for p in patterns if not p.startswith("!")
                       and (fnmatch(prefix, p.lstrip("/")) or fnmatch(prefix, p.removeprefix("**/")))]
                assert not hit, f".dockerignore {hit} hides {src}, which the Dockerfile copies"


def test_pip_runtime_env_installs_what_pyproject_asks_for():
    """jobs/runtime_env.pip.yaml stands in for the image on a stock Ray image: raylm's
    dependencies (Ray aside) and the export extra, with pyproject.toml's pins."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.pip.yaml").read_text())
    packages = {r.name: r for r in map(Requirement, env["pip"]["packages"])}
    wanted = {name: r for name, r in _pyproject_requirements().items() if name != "ray"}
    assert packages.keys() == wanted.keys(), (sorted(packages), sorted(wanted))
    for name, r in wanted.items():
        assert packages[name].specifier == r.specifier, f"runtime_env.pip.yaml: {packages[name]}, pyproject: {r}"


def test_a_job_upload_leaves_the_repository_history_out():
    """`ray job submit --working-dir .` zips what Ray's packaging walks: .git was most of it,
    and its config can hold a remote URL with a token, which then reached every node."""
    import logging

    from ray._private.runtime_env.packaging import _dir_travel

    seen: list[str] = []
    _dir_travel(REPO, [], lambda p: seen.append(p.relative_to(REPO).as_posix()), include_gitignore=True,
                logger=logging.getLogger("test"))
    assert "raylm/__init__.py" in seen and "jobs/run.py" in seen
    assert not [p for p in seen if p == ".git" or p.startswith(".git/")]
