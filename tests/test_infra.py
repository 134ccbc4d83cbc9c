"""Deployment files parse and carry the fields that make them work (no cluster needed).

Every YAML under infra/ is loaded with PyYAML; Kubernetes objects need apiVersion, kind and
metadata.name; containers need an image (and a command where Kubernetes, not KubeRay, starts
them); the GPU worker groups request nvidia.com/gpu; scheduled forms never overlap runs
(CronJob: concurrencyPolicy Forbid; RayCronJob, which has no such field: a deadline shorter
than the schedule's period); cron strings are valid 5-field expressions; the job spec in the
ConfigMap is a valid spec with no literal secrets. The Dockerfile and the systemd units are
checked for their essential instructions and keys.
"""

from __future__ import annotations

import configparser
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from jobs.schedule import Cron  # noqa: E402
from jobs.spec import parse_spec  # noqa: E402

INFRA = Path(__file__).resolve().parents[1] / "infra"
YAML_FILES = sorted(INFRA.rglob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> dict[str, dict]:
    return {f"{p.relative_to(INFRA)}:{d['kind']}/{d['metadata']['name']}": d
            for p in YAML_FILES for d in docs(p)}


def one(path: str, kind: str) -> dict:
    (d,) = [d for d in docs(INFRA / path) if d["kind"] == kind]
    return d


def ray_cluster_specs(d: dict) -> list[dict]:
    if d["kind"] == "RayCluster":
        return [d["spec"]]
    if d["kind"] == "RayJob":
        return [d["spec"]["rayClusterSpec"]]
    if d["kind"] == "RayCronJob":
        return [d["spec"]["jobTemplate"]["rayClusterSpec"]]
    return []


def period_seconds(expr: str, tz: str = "UTC") -> float:
    """The shortest gap between fires over a year (a lower bound for any deadline)."""
    cron, t = Cron(expr, tz), datetime(2025, 1, 1, tzinfo=UTC)
    gaps = []
    for _ in range(400):
        n = cron.next_after(t)
        gaps.append((n - t).total_seconds())
        t = n
    return min(gaps[1:])


def test_expected_files_exist():
    names = {str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file()}
    assert {"Dockerfile", "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
            "kuberay/raycronjob.yaml", "k8s/cronjob.yaml", "k8s/job-configmap.yaml",
            "systemd/sgarc-nightly.service", "systemd/sgarc-nightly.timer",
            "systemd/sgarc-scheduler.service"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_is_a_named_kubernetes_object(path):
    objects = docs(path)
    assert objects
    for d in objects:
        assert isinstance(d.get("apiVersion"), str) and d["apiVersion"]
        assert isinstance(d.get("kind"), str) and d["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])


def _pod_specs(d: dict) -> list[tuple[str, dict]]:
    """(who starts the containers, pod spec) for every pod template in an object."""
    out = []
    for cluster in ray_cluster_specs(d):
        out.append(("kuberay", cluster["headGroupSpec"]["template"]["spec"]))
        out += [("kuberay", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    if d["kind"] == "CronJob":
        out.append(("kubernetes", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def test_containers_have_images_commands_and_a_non_root_user():
    pods = [(name, who, pod) for name, d in all_docs().items() for who, pod in _pod_specs(d)]
    assert len(pods) >= 7
    for name, who, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for c in pod["containers"]:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", c["image"]), (name, c["image"])
            if who == "kubernetes":  # KubeRay writes the `ray start` command itself
                assert c["command"][:2] == ["sgarc", "submit"], name


def test_gpu_worker_groups_request_gpus_and_match_the_ray_version():
    dockerfile = (INFRA / "Dockerfile").read_text()
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    clusters = [(n, c) for n, d in all_docs().items() for c in ray_cluster_specs(d)]
    assert {n.split(":")[1].split("/")[0] for n, _ in clusters} == {
        "RayCluster", "RayJob", "RayCronJob"}
    for name, cluster in clusters:
        assert cluster["rayVersion"] == ray_version, name
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        gpu_groups = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu_groups, name
        for g in gpu_groups:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
            (c,) = g["template"]["spec"]["containers"]
            for kind in ("requests", "limits"):
                assert int(c["resources"][kind]["nvidia.com/gpu"]) == 1, name
                assert c["resources"][kind]["memory"], name


def test_rayjob_runs_the_spec_from_the_configmap_with_secrets_from_the_secret():
    configmap = one("k8s/job-configmap.yaml", "ConfigMap")
    for path, kind in (("kuberay/rayjob.yaml", "RayJob"),
                       ("kuberay/raycronjob.yaml", "RayCronJob")):
        d = one(path, kind)
        job = d["spec"] if kind == "RayJob" else d["spec"]["jobTemplate"]
        argv = shlex.split(job["entrypoint"])
        assert argv[:2] == ["sgarc", "submit"] and "--local" in argv
        assert job["shutdownAfterJobFinishes"] is True
        head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        (mount,) = head["containers"][0]["volumeMounts"]
        assert Path(argv[2]).parent == Path(mount["mountPath"])
        (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        assert Path(argv[2]).name in configmap["data"]
        for group in [job["rayClusterSpec"]["headGroupSpec"],
                      *job["rayClusterSpec"]["workerGroupSpecs"]]:
            (c,) = group["template"]["spec"]["containers"]
            assert {"secretRef": {"name": "sgarc-storage"}} in c["envFrom"]


def test_configmap_holds_a_valid_spec_without_literal_secrets():
    configmap = one("k8s/job-configmap.yaml", "ConfigMap")
    spec = parse_spec(configmap["data"]["job.toml"], source="job-configmap.yaml")
    assert spec.literal_secrets() == []
    assert "${AWS_SECRET_ACCESS_KEY}" in spec.describe()
    assert spec.input_url.startswith("s3://") and spec.refine.enabled


def test_scheduled_forms_never_overlap_runs():
    cron = one("k8s/cronjob.yaml", "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    Cron(cron["spec"]["schedule"], cron["spec"].get("timeZone", "UTC"))
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "--wait" in c["command"] and "--address" in c["command"]  # the pod lives as
    # long as the run, so Forbid covers the run itself
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"

    raycron = one("kuberay/raycronjob.yaml", "RayCronJob")
    assert raycron["apiVersion"] == "ray.io/v1"
    schedule = raycron["spec"]["schedule"]
    Cron(schedule, "UTC")
    # No concurrencyPolicy in RayCronJob (KubeRay 1.6): a run must end before the next fire.
    deadline = raycron["spec"]["jobTemplate"]["activeDeadlineSeconds"]
    assert 0 < deadline < period_seconds(schedule)
    deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert 0 < deadline < period_seconds(cron["spec"]["schedule"])


def test_standing_cluster_service_matches_the_cronjob_address():
    cluster = one("kuberay/raycluster.yaml", "RayCluster")
    (c,) = one("k8s/cronjob.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"][
        "spec"]["containers"]
    address = c["command"][c["command"].index("--address") + 1]
    head_ports = {p["name"]: p["containerPort"]
                  for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
                      "ports"]}
    assert address == f"http://{cluster['metadata']['name']}-head-svc:{head_ports['dashboard']}"


def test_dockerfile():
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())  # join continuations
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    instructions = [ln.split()[0] for ln in lines]
    assert set(instructions) <= {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER",
                                 "ENTRYPOINT", "CMD"}
    assert instructions.index("FROM") < instructions.index("ENTRYPOINT")
    args = {ln.split()[1].split("=")[0]: ln.split("=", 1)[1] for ln in lines
            if ln.startswith("ARG ") and "=" in ln}
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    assert {"TORCH_VERSION", "TORCH_INDEX_URL", "RAY_VERSION"} <= set(args)
    assert any(ln.startswith("FROM ${PYTHON_IMAGE}") for ln in lines)
    (entrypoint,) = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
    assert entrypoint == 'ENTRYPOINT ["sgarc"]'
    (user,) = [ln for ln in lines if ln.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert lines.index(user) > max(i for i, ln in enumerate(lines) if ln.startswith("RUN "))
    ignore = (INFRA / "Dockerfile.dockerignore").read_text()
    assert "!codec/" in ignore and "!jobs/" in ignore


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((INFRA / "systemd" / name).read_text())
    return parser


def test_systemd_units():
    nightly = _unit("sgarc-nightly.service")
    assert nightly["Service"]["Type"] == "oneshot"
    argv = shlex.split(nightly["Service"]["ExecStart"])
    assert Path(argv[0]).name == "sgarc" and argv[1:3] == ["submit", "/etc/sgarc/nightly.toml"]
    assert "--local" in argv

    timer = _unit("sgarc-nightly.timer")
    assert re.fullmatch(r"\*-\*-\* \d\d:\d\d:\d\d", timer["Timer"]["OnCalendar"])
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "sgarc-nightly.service"
    assert timer["Install"]["WantedBy"] == "timers.target"

    daemon = _unit("sgarc-scheduler.service")
    argv = shlex.split(daemon["Service"]["ExecStart"])
    assert argv[1:3] == ["scheduler", "run"] and "--once" not in argv
    assert daemon["Service"]["Restart"] == "on-failure"
    assert daemon["Service"]["KillMode"] == "process"  # runs outlive a daemon restart
    for unit in (nightly, daemon):
        assert unit["Service"]["User"] != "root"
        assert "SGARC_HOME=" in unit["Service"]["Environment"]
