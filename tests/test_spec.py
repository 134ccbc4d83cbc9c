"""Job specs and submission: validation messages, env expansion, redaction, filters, a local
run through the pipeline, and the Ray Jobs API against a real local Ray head.

Light on purpose (2 busy cores): tiny images, the amortized method, one shared in-process
Ray for the local runs, and one `ray start --head` (own ports, own temp dir) for the Jobs
API test, stopped by its process group at the end.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # before ray is imported: local clusters, no tokens

import argparse
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from jobs import submit as jobs_submit
from jobs.spec import FilterSpec, JobSpec, SpecError, filter_images, load_spec, parse_spec
from pipeline.storage import ObjectInfo
from tests.conftest import smooth_image

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-VALUE-never-shown"


def write_spec(tmp_path: Path, body: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


MINIMAL = """
    [job]
    input = "photos"
    output = "archive"
"""


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_full_spec_loads_and_maps_to_pipeline_objects(tmp_path, monkeypatch):
    path = write_spec(tmp_path, """
        [job]
        name = "photos-nightly"
        input = "s3://bucket/photos"
        output = "archive"
        manifest = "keys.txt"

        [storage.options]
        key = "${TEST_KEY_ID}"
        secret = "${TEST_SECRET}"
        client_kwargs = { endpoint_url = "http://minio:9000" }

        [encode]
        quality = 4
        method = "amortized"
        iterations = 10
        lr = 0.001
        seed = 3
        alpha = "flatten"
        depth = "reduce"
        metadata = "drop-oversized"
        max_pixels = 1000000

        [run]
        shard_size = 4
        gpus = 2
        address = "http://head:8265"
        device = "cuda"

        [filters]
        extensions = ["JPG", ".png"]
        include = ["2024/**"]
        exclude = ["**/thumbs/**"]
        min_bytes = 10
        max_bytes = 1_000_000

        [refine]
        enabled = true
        iterations = 50
        max_images = 100
    """)
    spec = load_spec(path)
    assert spec.name == "photos-nightly"
    assert spec.input_url == "s3://bucket/photos"
    assert spec.output_url == str(tmp_path / "archive")  # relative to the spec's folder
    s = spec.to_settings()
    assert (s.quality, s.model, s.method, s.iterations, s.lr, s.seed, s.alpha, s.depth,
            s.metadata, s.max_pixels) == (4, None, "amortized", 10, 0.001, 3, "flatten",
                                          "reduce", "drop-oversized", 1_000_000)
    r = spec.refine_settings()
    assert (r.method, r.iterations, r.lr, r.quality) == ("sga", 50, None, 4)
    assert spec.refine.enabled and spec.refine.max_images == 100
    o = spec.to_options(progress=False)
    assert (o.shard_size, o.actors, o.device, o.manifest, o.address) == (4, 2, "cuda",
                                                                         "keys.txt", None)
    assert o.image_filter is not None
    assert spec.filters.extensions == (".jpg", ".png")
    monkeypatch.setenv("TEST_KEY_ID", "AKIA1")
    monkeypatch.setenv("TEST_SECRET", SECRET)
    assert spec.storage_options() == {"key": "AKIA1", "secret": SECRET,
                                      "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert spec.literal_secrets() == []


def test_defaults(tmp_path):
    spec = load_spec(write_spec(tmp_path, MINIMAL, "my-job.toml"))
    assert spec.name == "my-job"
    assert (spec.encode.method, spec.encode.iterations, spec.run.shard_size) == ("sga", 1000,
                                                                                  16)
    assert not spec.refine.enabled and spec.refine.method == "sga"
    assert not spec.filters.active and spec.to_options().image_filter is None
    assert spec.storage_options() == {}


@pytest.mark.parametrize("body, needles", [
    ("[job]\ninput='a'\noutput='b'\n[encode]\nqualty = 3\n",
     ["unknown [encode] key 'qualty'", "did you mean 'quality'", "allowed: quality, model"]),
    ("[job]\ninput='a'\noutput='b'\n[jobs]\nx=1\n", ["unknown table key 'jobs'", "allowed: job"]),
    ("[job]\ninput='a'\noutput='b'\n[encode]\nquality = 'high'\n",
     ["[encode] quality: expected an integer, got string 'high'"]),
    ("[job]\ninput='a'\noutput='b'\n[run]\nshard_size = 0\n",
     ["[run] shard_size: must be >= 1, got 0"]),
    ("[job]\ninput='a'\noutput='b'\n[run]\nactors = true\n",
     ["[run] actors: expected an integer, got boolean true"]),
    ("[job]\ninput='a'\noutput='b'\n[encode]\nmethod = 'fast'\n",
     ["[encode] method: 'fast' is not one of amortized, sga"]),
    ("[job]\noutput='b'\n", ["[job] input is required"]),
    ("[job]\ninput='a'\noutput='b'\n[encode]\nquality = 99\n", ["[encode]", "99"]),
    ("[job]\ninput='a'\noutput='b'\n[encode]\nquality = 4\nmodel = 'x'\n",
     ["give quality or model, not both"]),
    ("[job]\ninput='a'\noutput='b'\n[run]\naddress = 'ray://head:10001'\n",
     ["Ray Client address", "http://head:8265"]),
    ("[job]\ninput='a'\noutput='b'\n[refine]\nenabled = 'yes'\n",
     ["[refine] enabled: expected true or false"]),
    ("[job]\ninput='a'\noutput='b'\n[refine]\nmethod = 'amortized'\n",
     ["[refine] method: 'amortized' is not one of sga"]),
    ("[job]\ninput='a'\noutput='b'\n[refine]\nmax_images = 0\n", ["[refine] max_images"]),
    ("[job]\ninput='a'\noutput='b'\n[filters]\nextensions = ['heic']\n",
     ["[filters] extensions: 'heic' is not an image type"]),
    ("[job]\ninput='a'\noutput='b'\n[filters]\ninclude = ['a**b']\n",
     ["pattern 'a**b'", "entire path component"]),
    ("[job]\ninput='a'\noutput='b'\n[storage.options]\nsecret = '${NOT VALID}'\n",
     ["not an environment variable name"]),
    ("[job]\ninput='a'\noutput='a/'\n", ["same place"]),
    ("[job]\ninput='a'\noutput='b'\n[policy]\nmin_psnr = 0\n",
     ["[policy] min_psnr: must be > 0, got 0"]),
    ("[job]\ninput='a'\noutput='b'\n[policy]\nmin_pnsr = 38\n",
     ["unknown [policy] key 'min_pnsr' (did you mean 'min_psnr'?)"]),
    ("[job\ninput='a'\n", ["not valid TOML"]),
])
def test_errors_name_file_and_key(tmp_path, body, needles):
    path = write_spec(tmp_path, body)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for needle in needles:
        assert needle in message, message


def test_policy_table_sets_the_floor_of_both_passes(tmp_path):
    body = ("[job]\ninput='a'\noutput='b'\n[refine]\nenabled = true\n"
            "[policy]\nmin_psnr = 38\n")
    spec = load_spec(write_spec(tmp_path, body))
    assert spec.policy.min_psnr == 38.0
    assert spec.to_settings().min_psnr == spec.refine_settings().min_psnr == 38.0
    assert "PSNR >= 38 dB, never bigger than the source" in spec.describe()
    plain = load_spec(write_spec(tmp_path, "[job]\ninput='a'\noutput='b'\n", "plain.toml"))
    assert plain.to_settings().min_psnr is None
    assert plain.to_settings().fingerprint() != spec.to_settings().fingerprint()


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.toml")


# ---------------------------------------------------------------------------------------------
# Environment references and secrets
# ---------------------------------------------------------------------------------------------


def test_env_expansion_at_run_time_and_missing_variable(tmp_path, monkeypatch):
    spec = load_spec(write_spec(tmp_path, MINIMAL + """
        [storage.options]
        token = "Bearer ${TEST_TOKEN}"
        list = ["${TEST_TOKEN}", 3]
        anon = false
    """))
    monkeypatch.delenv("TEST_TOKEN", raising=False)
    with pytest.raises(SpecError, match=r"options.token refers to \$\{TEST_TOKEN\}, which is "
                       "not set"):
        spec.storage_options()
    monkeypatch.setenv("TEST_TOKEN", SECRET)
    assert spec.storage_options() == {"token": f"Bearer {SECRET}", "list": [SECRET, 3],
                                      "anon": False}
    assert spec.storage_options({"TEST_TOKEN": "x"})["token"] == "Bearer x"


def test_secrets_are_redacted_in_repr_and_describe(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_SECRET", SECRET)
    spec = load_spec(write_spec(tmp_path, MINIMAL + f"""
        [storage.options]
        key = "${{TEST_SECRET}}"
        password = "{SECRET}-literal"
        client_kwargs = {{ endpoint_url = "http://minio:9000", aws_session_token = "{SECRET}" }}
    """))
    for text in (repr(spec), spec.describe(), str(spec)):
        assert SECRET not in text
        assert "${TEST_SECRET}" in text and "http://minio:9000" in text and "***" in text
    assert spec.literal_secrets() == ["password", "client_kwargs.aws_session_token"]
    with pytest.raises(SpecError, match="literal values") as info:
        jobs_submit.submit_cluster(spec, "http://127.0.0.1:1", client=object())
    assert SECRET not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


def _objs(*items):
    return [ObjectInfo(k, s, "v") for k, s in items]


def test_filter_images():
    images = _objs(("a.jpg", 100), ("b.PNG", 5), ("2024/c.jpg", 100), ("2024/x/d.jpg", 100),
                   ("2024/thumbs/e.jpg", 100), ("2023/f.webp", 2000))
    keys = lambda f: [im.key for im in filter_images(images, f)]  # noqa: E731
    assert keys(FilterSpec()) == [im.key for im in images]
    assert keys(FilterSpec(extensions=(".png",))) == ["b.PNG"]
    assert keys(FilterSpec(include=("*.jpg",))) == ["a.jpg"]  # '*' stays in one segment
    assert keys(FilterSpec(include=("**/*.jpg",))) == ["a.jpg", "2024/c.jpg", "2024/x/d.jpg",
                                                       "2024/thumbs/e.jpg"]
    assert keys(FilterSpec(include=("2024/**",), exclude=("**/thumbs/**",))) == [
        "2024/c.jpg", "2024/x/d.jpg"]
    assert keys(FilterSpec(include=("202[3]/?.*",))) == ["2023/f.webp"]
    assert keys(FilterSpec(include=("202[!3]/*",))) == ["2024/c.jpg"]
    assert keys(FilterSpec(min_bytes=100, max_bytes=1000)) == [
        "a.jpg", "2024/c.jpg", "2024/x/d.jpg", "2024/thumbs/e.jpg"]


# ---------------------------------------------------------------------------------------------
# Local runs
# ---------------------------------------------------------------------------------------------



def make_photos(folder: Path, n: int = 3, size: int = 48) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(smooth_image(size, size, seed=i)).save(folder / f"p{i}.png")
    (folder / "skip").mkdir(exist_ok=True)
    Image.fromarray(smooth_image(size, size, seed=9)).save(folder / "skip" / "s.png")


def _parser():
    parser = argparse.ArgumentParser(prog="sgarc")
    jobs_submit.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _cli(*argv) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


def test_submit_local_runs_filters_refines_and_hides_secrets(tmp_path, local_ray, capsys,
                                                             monkeypatch):
    make_photos(tmp_path / "photos")
    monkeypatch.setenv("TEST_SECRET", SECRET)
    path = write_spec(tmp_path, """
        [job]
        name = "tiny"
        input = "photos"
        output = "out"
        [storage.options]
        auto_mkdir = true
        secret_marker = "${TEST_SECRET}"
        [encode]
        method = "amortized"
        [run]
        shard_size = 2
        actors = 2
        [filters]
        exclude = ["skip/**"]
        [refine]
        enabled = true
        iterations = 3
        max_images = 1
    """)
    # storage options go to fsspec: the local filesystem takes (and ignores) extra ones
    result = tmp_path / "result.json"
    assert jobs_submit.main([str(path), "--no-progress", "--result-file", str(result)]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "encode run" in out.out
    r = json.loads(result.read_text())
    assert r["status"] == "succeeded" and r["exit_code"] == 0
    coverage, refinement = r["summaries"]
    assert (coverage["images"], coverage["ok"], coverage["errors"]) == (3, 3, 0)
    assert refinement["mode"] == "refine" and refinement["images"] <= 1
    bitstreams = sorted(p.name for p in (tmp_path / "out" / "bitstreams").rglob("*.sga"))
    assert bitstreams == ["p0.png.sga", "p1.png.sga", "p2.png.sga"]  # skip/ filtered out
    assert SECRET not in (tmp_path / "out" / "_jobs").joinpath(
        coverage["run_id"], "plan.json").read_text()

    # A rerun is incremental: nothing left to encode.
    spec = load_spec(path)
    again = jobs_submit.submit_local(spec, progress=False, echo=lambda line: None)
    assert (again.images, again.skipped) == (0, 3)

    # jobs list / status read the runs recorded under the output.
    assert _cli("jobs", "list", str(path)) == 0
    listing = capsys.readouterr().out
    assert coverage["run_id"] in listing and "finished" in listing
    assert _cli("jobs", "status", coverage["run_id"], "--spec", str(path)) == 0
    assert "3 ok, 0 errors" in capsys.readouterr().out
    with pytest.raises(Exception, match="cluster jobs"):
        _cli("jobs", "logs", coverage["run_id"], "--spec", str(path))


def test_submit_reports_a_missing_secret_without_running(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TEST_MISSING", raising=False)
    path = write_spec(tmp_path, MINIMAL + '[storage.options]\nkey = "${TEST_MISSING}"\n')
    result = tmp_path / "r.json"
    assert jobs_submit.main([str(path), "--result-file", str(result)]) == 2
    assert "TEST_MISSING" in capsys.readouterr().err
    assert json.loads(result.read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# Ray Jobs API against a real local head
# ---------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with its own ports and temp dir, in its own process group
    (stopped by that group, never by `ray stop`, which would stop every Ray on the host)."""
    (gcs, dash, client, node, objm, agent_grpc, agent_http, metrics, renv) = _free_ports(9)
    temp = tempfile.mkdtemp(prefix="sgr", dir="/tmp")  # short: Unix socket paths are limited
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TEST_SECRET=SECRET,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    log = open(Path(temp) / "head.log", "wb")  # noqa: SIM115 - closed at teardown
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--node-manager-port={node}", f"--object-manager-port={objm}",
           f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--dashboard-agent-listen-port={agent_http}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={renv}", "--num-cpus=1", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=temp,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                from ray.job_submission import JobSubmissionClient

                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (Path(temp) / "head.log").read_text(errors="replace")[-1500:]
                    pytest.skip(f"a local Ray head with the dashboard (Jobs API) did not come "
                                f"up on this machine: {tail}")
                time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # ray start --block stops its processes
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of our own group only
        proc.wait()
        log.close()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_submit_cluster_through_the_jobs_api(tmp_path, ray_head, capsys):
    from ray.job_submission import JobSubmissionClient

    make_photos(tmp_path / "photos", n=2, size=32)
    path = write_spec(tmp_path, f"""
        [job]
        name = "cluster-tiny"
        input = "{tmp_path / 'photos'}"
        output = "{tmp_path / 'out'}"
        [storage.options]
        secret_marker = "${{TEST_SECRET}}"
        [encode]
        method = "amortized"
        [filters]
        exclude = ["skip/**"]
        [run]
        address = "{ray_head}"
    """)
    assert _cli("submit", str(path)) == 0
    out = capsys.readouterr().out
    job_id = out.split("as Ray job ")[1].split()[0]
    assert job_id.startswith("sgarc-cluster-tiny-")
    client = JobSubmissionClient(ray_head)
    status = jobs_submit.follow_logs(client, job_id, poll=1.0, out=io.StringIO(), timeout=240)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "encode run" in logs and "2 images (2 ok" in logs
    info = client.get_job_info(job_id)
    assert SECRET not in logs + info.entrypoint + json.dumps(info.runtime_env or {})
    assert (info.metadata or {}).get("sgarc_job") == "cluster-tiny"
    assert len(list((tmp_path / "out" / "bitstreams").rglob("*.sga"))) == 2

    assert _cli("jobs", "list", "--address", ray_head) == 0
    assert job_id in capsys.readouterr().out
    assert _cli("jobs", "status", job_id, "--spec", str(path)) == 0  # address from the spec
    assert "SUCCEEDED" in capsys.readouterr().out
    assert _cli("jobs", "logs", job_id, "--address", ray_head) == 0
    assert "encode run" in capsys.readouterr().out
    assert _cli("jobs", "cancel", job_id, "--address", ray_head) == 0
    assert "not running" in capsys.readouterr().out


def test_cluster_submission_refuses_relative_paths(tmp_path):
    spec = parse_spec("[job]\ninput='photos'\noutput='s3://b/out'\n", source="x.toml")
    assert isinstance(spec, JobSpec)
    with pytest.raises(SpecError, match="relative to this machine"):
        jobs_submit.submit_cluster(spec, "http://127.0.0.1:1", client=object())
