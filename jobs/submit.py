"""Running a job spec: here (embedded defaults) or on a Ray cluster through the Jobs API.

    sgarc submit job.toml                         # here: in-process Ray, the spec's storage
    sgarc submit job.toml --address http://head:8265   # a Ray cluster (or [run] address)
    sgarc jobs list [job.toml] [--address URL]    # cluster jobs, or the spec's local runs
    sgarc jobs status|logs|cancel ID [--address URL | --spec job.toml]

A cluster job runs ``python -m jobs.submit --spec-env SGARC_SPEC_TOML --local`` on the
cluster (the same as ``sgarc submit SPEC --local``, without needing the console script on
PATH). The spec travels as text in the job's runtime_env; it holds no secrets, only
``${ENV}`` references that the driver expands from the cluster's own environment (a
Kubernetes Secret, say). A spec with a literal secret is refused for cluster submission.

A local run is the coverage pass (new or changed images, pipeline.run.run) and then, when
``[refine] enabled``, the refinement pass (pipeline.run.refine). Image error rows do not
fail a job (DESIGN.md, decision 5): the exit status is 0 when the passes completed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from codec.errors import SgarcError
from codec.files import atomic_write
from jobs.spec import JobSpec, SpecError, load_spec, parse_spec
from pipeline.storage import redact_url

SPEC_ENV = "SGARC_SPEC_TOML"  # the spec's text, in a cluster job's runtime_env
SPEC_SOURCE_ENV = "SGARC_SPEC_SOURCE"  # where that text came from (for messages)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ---------------------------------------------------------------------------------------------
# Local runs
# ---------------------------------------------------------------------------------------------


def run_spec(spec: JobSpec, *, progress: bool = True, echo=print,
             dry_run: bool = False) -> list:
    """Run the spec's passes in this process; their RunSummary objects, in order.

    The coverage pass encodes what is new or changed (the pipeline skips what an earlier
    run did with the same settings), so a nightly run of the same spec is incremental. With
    ``[refine] enabled`` the refinement pass follows (``pipeline.run.refine``)."""
    from pipeline import run as pipeline_run

    storage_options = spec.storage_options()  # expanded here, where the run happens
    options = spec.to_options(progress=progress)
    options.dry_run = dry_run
    summaries = [pipeline_run.run(spec.input_url, spec.output_url, spec.to_settings(),
                                  options, storage_options)]
    echo(summaries[-1].line())
    if spec.refine.enabled:
        summaries.append(pipeline_run.refine(spec.input_url, spec.output_url,
                                             spec.refine_settings(), options, storage_options,
                                             spec.refine.max_images))
        echo(summaries[-1].line())
    return summaries


def submit_local(spec: JobSpec, *, progress: bool = True, echo=print):
    """Run the spec here (in-process Ray, or the cluster of the Ray job this runs in);
    the coverage pass's RunSummary (``run_spec`` returns the refinement pass's too)."""
    return run_spec(spec, progress=progress, echo=echo)[0]


# ---------------------------------------------------------------------------------------------
# Cluster runs (Ray Jobs API)
# ---------------------------------------------------------------------------------------------


def job_client(address: str):
    """A JobSubmissionClient for a Ray dashboard address (http://head:8265)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SgarcError(f"cannot reach the Ray Jobs API at {redact_url(address)}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None


def cluster_entrypoint(*, progress: bool = False) -> str:
    """What a cluster job runs: this module, reading the spec from its environment."""
    args = ["python", "-m", "jobs.submit", "--spec-env", SPEC_ENV, "--local"]
    if not progress:
        args.append("--no-progress")
    return shlex.join(args)


def new_submission_id(name: str) -> str:
    return f"sgarc-{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def submit_cluster(spec_or_path: JobSpec | str | os.PathLike[str], address: str | None = None,
                   *, submission_id: str | None = None, client: Any = None) -> str:
    """Submit the spec as a Ray job; its submission id.

    ``address`` defaults to the spec's ``[run] address``. The spec's text goes along in
    the job's runtime_env (entrypoint and runtime_env are visible to anyone who can see
    the cluster's jobs, hence the refusal of literal secrets); relative local paths are
    refused since the cluster cannot see this machine's working directory."""
    spec = spec_or_path if isinstance(spec_or_path, JobSpec) else load_spec(spec_or_path)
    address = address or spec.run.address
    if not address:
        raise SpecError(f"{spec.source}: no cluster address: pass --address or set "
                        "[run] address (e.g. http://head:8265)")
    literal = spec.literal_secrets()
    if literal:
        raise SpecError(f"{spec.source}: [storage] options {', '.join(literal)} hold literal "
                        "values; a cluster job's spec is visible on the cluster, so refer to "
                        "environment variables set there instead, e.g. "
                        "secret = \"${AWS_SECRET_ACCESS_KEY}\"")
    for key, value in (("input", spec.input), ("output", spec.output)):
        if "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            raise SpecError(f"{spec.source}: [job] {key} {value!r} is relative to this "
                            "machine; a cluster job needs a URL or an absolute path on the "
                            "cluster")
    client = client or job_client(address)
    return client.submit_job(
        entrypoint=cluster_entrypoint(),
        submission_id=submission_id or new_submission_id(spec.name),
        runtime_env={"env_vars": {SPEC_ENV: spec.text, SPEC_SOURCE_ENV: spec.source}},
        metadata={"sgarc_job": spec.name, "sgarc_spec": os.path.basename(spec.source)})


def follow_logs(client: Any, job_id: str, *, poll: float = 2.0, out=sys.stdout,
                timeout: float | None = None) -> str:
    """Print a job's logs as they grow until it ends; its final status."""
    printed = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(status_value(client.get_job_status(job_id)))
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SgarcError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def follow_or_stop(client: Any, job_id: str) -> str:
    """``follow_logs``; on Ctrl-C or SIGTERM (a Kubernetes pod being stopped) stop the Ray
    job too, so a run never outlives the process that waits for it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    try:
        return follow_logs(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"interrupted: stopped Ray job {job_id}", file=sys.stderr)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def status_value(status: Any) -> str:
    return getattr(status, "value", status)


# ---------------------------------------------------------------------------------------------
# Local run records (<output>/_jobs/<run id>/plan.json, summary.json)
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalRun:
    run_id: str
    mode: str  # "encode" (coverage) or "refine"
    created: str
    images: int  # planned
    shards: int
    done_shards: int
    status: str  # "finished" (summary.json written) or "unfinished" (running or interrupted)
    summary: dict | None


def local_runs(spec: JobSpec, run_id: str | None = None) -> list[LocalRun]:
    """The runs recorded under the spec's output, oldest first (or just ``run_id``)."""
    from pipeline import sink
    from pipeline.plan import Plan, plan_key, summary_key
    from pipeline.storage import Storage

    output = Storage(spec.output_url, spec.storage_options())
    if run_id is not None:
        if not output.exists(plan_key(run_id)):
            raise SgarcError(f"no run {run_id!r} under {output.url}")
        keys = [plan_key(run_id)]
    else:
        keys = output.list_keys("_jobs", "plan.json")
    runs = []
    for key in keys:
        if key.count("/") != 2:  # a plan's manifests live beside its plan.json
            continue
        plan = Plan.from_json(output.read_bytes(key))
        summary = (json.loads(output.read_bytes(summary_key(plan.run_id)))
                   if output.exists(summary_key(plan.run_id)) else None)
        done = (plan.num_shards if summary else
                len(sink.committed_shards(output, plan.run_id)))  # one listing per run
        runs.append(LocalRun(plan.run_id, plan.mode, plan.created, plan.num_images,
                             plan.num_shards, done, "finished" if summary else "unfinished",
                             summary))
    return sorted(runs, key=lambda r: r.created)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add ``submit`` and ``jobs {list,status,logs,cancel}`` to the sgarc parser."""
    p = subparsers.add_parser(
        "submit", help="run a job spec here or on a Ray cluster",
        description="Run the job spec SPEC (TOML, see docs/jobs.md). Without an address "
        "(--address or the spec's [run] address) or with --local it runs here: in-process "
        "Ray, or the cluster of the Ray job it runs in. With an address it is submitted "
        "through the Ray Jobs API and the job id is printed.")
    _add_submit_args(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="list, inspect, follow or cancel runs",
                              description="Cluster jobs (Ray Jobs API) with --address or a "
                              "spec whose [run] address is set; otherwise the runs recorded "
                              "under the spec's output.")
    sub = p.add_subparsers(dest="jobs_command", required=True)
    q = sub.add_parser("list", help="list jobs (cluster) or runs (local)")
    q.add_argument("spec", nargs="?", metavar="SPEC")
    _add_where_args(q, spec_option=False)
    q.set_defaults(func=cmd_jobs_list)
    q = sub.add_parser("status", help="one job's or run's status")
    q.add_argument("job_id", metavar="ID")
    _add_where_args(q)
    q.set_defaults(func=cmd_jobs_status)
    q = sub.add_parser("logs", help="a cluster job's logs")
    q.add_argument("job_id", metavar="ID")
    q.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    _add_where_args(q)
    q.set_defaults(func=cmd_jobs_logs)
    q = sub.add_parser("cancel", help="stop a cluster job")
    q.add_argument("job_id", metavar="ID")
    _add_where_args(q)
    q.set_defaults(func=cmd_jobs_cancel)


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC", help="the job spec (TOML)")
    p.add_argument("--address", default=None,
                   help="Ray Jobs API address, e.g. http://head:8265 (default: the spec's "
                   "[run] address; none: run here)")
    p.add_argument("--local", action="store_true",
                   help="run here even if the spec names a cluster")
    p.add_argument("--dry-run", action="store_true",
                   help="plan here and print what each pass would encode and skip, in how "
                        "many shards; starts no Ray, submits nothing, writes nothing")
    p.add_argument("--wait", action="store_true",
                   help="cluster: print the job's logs until it ends; exit 1 unless it "
                   "succeeded")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--spec-env", default=None, metavar="VAR",
                   help="read the spec's text from environment variable VAR (cluster jobs)")
    p.add_argument("--result-file", default=None, metavar="PATH",
                   help="local: write the outcome as JSON to PATH (used by the scheduler)")


def _add_where_args(p: argparse.ArgumentParser, spec_option: bool = True) -> None:
    p.add_argument("--address", default=None, help="Ray Jobs API address (http://head:8265)")
    if spec_option:
        p.add_argument("--spec", default=None, metavar="SPEC",
                       help="the job spec: its [run] address, or its output's runs")
    p.add_argument("--local", action="store_true",
                   help="the spec's local runs even if it names a cluster")


def _spec_from_args(args) -> JobSpec:
    if args.spec_env:
        text = os.environ.get(args.spec_env)
        if text is None:
            raise SpecError(f"environment variable {args.spec_env} (the spec) is not set")
        return parse_spec(text, source=os.environ.get(SPEC_SOURCE_ENV, f"${args.spec_env}"))
    if not args.spec:
        raise SpecError("give a spec file (or --spec-env VAR)")
    return load_spec(args.spec)


def cmd_submit(args) -> int:
    started = _now()
    result: dict[str, Any] = {"started": started, "status": "failed", "exit_code": 2}
    try:
        spec = _spec_from_args(args)
        address = None if args.local or args.dry_run else (args.address or spec.run.address)
        if address:
            client = job_client(address)
            job_id = submit_cluster(spec, address, client=client)
            print(f"submitted {spec.name} as Ray job {job_id} to {redact_url(address)}")
            print(f"follow: sgarc jobs logs {job_id} --address {redact_url(address)} -f")
            result.update(status="submitted", exit_code=0, job_id=job_id)
            if not args.wait:
                return 0
            status = follow_or_stop(client, job_id)
            print(f"job {job_id}: {status}")
            code = 0 if status == "SUCCEEDED" else 1
            result.update(status=status.lower(), exit_code=code)
            return code
        for name in spec.literal_secrets():
            print(f"sgarc submit: warning: {spec.source}: storage option {name} holds a "
                  f"literal secret; prefer an environment reference like \"${{VAR}}\"",
                  file=sys.stderr)
        print(f"running {spec.name} here: {redact_url(spec.input_url)} -> "
              f"{redact_url(spec.output_url)}", flush=True)
        summaries = run_spec(spec, progress=not args.no_progress,
                             echo=lambda line: print(line, flush=True), dry_run=args.dry_run)
        result.update(status="succeeded", exit_code=0,
                      summaries=[asdict(s) for s in summaries],
                      run_ids=[s.run_id for s in summaries],
                      errors=sum(s.errors for s in summaries))
        return 0
    except SgarcError as exc:
        result["error"] = str(exc)
        raise
    except BaseException as exc:
        result.update(status="failed" if isinstance(exc, Exception) else "interrupted",
                      exit_code=1, error=f"{type(exc).__name__}: {str(exc)[:500]}")
        raise
    finally:
        if args.result_file:
            result["finished"] = _now()
            atomic_write(args.result_file, json.dumps(result, indent=1).encode())


def _where(args) -> tuple[str | None, JobSpec | None]:
    spec_path = getattr(args, "spec", None)
    spec = load_spec(spec_path) if spec_path else None
    if args.address:
        return args.address, spec
    if spec is not None and spec.run.address and not args.local:
        return spec.run.address, spec
    if spec is None:
        raise SgarcError("give --address URL (cluster jobs) or a spec (its cluster, or its "
                         "local runs)")
    return None, spec


def cmd_jobs_list(args) -> int:
    address, spec = _where(args)
    if address:
        jobs = job_client(address).list_jobs()
        print(f"{'id':<44} {'status':<10} {'started':<20} {'name':<20} entrypoint")
        for job in sorted(jobs, key=lambda j: j.start_time or 0):
            name = (job.metadata or {}).get("sgarc_job", "-")
            print(f"{job.submission_id or job.job_id or '-':<44} "
                  f"{status_value(job.status):<10} {_ms(job.start_time):<20} {name:<20} "
                  f"{(job.entrypoint or '')[:60]}")
        return 0
    runs = local_runs(spec)
    if not runs:
        print(f"no runs under {spec.output_url}")
        return 0
    print(f"{'run':<26} {'mode':<7} {'status':<11} {'created':<20} {'images':>7} "
          f"{'shards':>9}  result")
    for r in runs:
        s = r.summary
        outcome = (f"{s['ok']} ok, {s['errors']} errors, {s['skipped']} skipped, "
                   f"{s['seconds']:.0f} s" if s else "running or interrupted")
        print(f"{r.run_id:<26} {r.mode:<7} {r.status:<11} {r.created[:19]:<20} "
              f"{r.images:>7} {r.done_shards:>4}/{r.shards:<4}  {outcome}")
    return 0


def cmd_jobs_status(args) -> int:
    address, spec = _where(args)
    if address:
        info = job_client(address).get_job_info(args.job_id)
        print(f"job:        {args.job_id}")
        print(f"status:     {status_value(info.status)}")
        if info.message:
            print(f"message:    {info.message}")
        print(f"started:    {_ms(info.start_time)}")
        print(f"ended:      {_ms(info.end_time)}")
        if info.driver_exit_code is not None:
            print(f"exit code:  {info.driver_exit_code}")
        print(f"entrypoint: {info.entrypoint}")
        return 0
    (r,) = local_runs(spec, args.job_id)
    print(f"run:        {r.run_id} ({r.mode})")
    print(f"status:     {r.status}" + ("" if r.summary else " (running or interrupted; "
                                        "submitting the spec again resumes it)"))
    print(f"created:    {r.created}")
    print(f"progress:   {r.done_shards}/{r.shards} shards, {r.images} images planned")
    if r.summary:
        s = r.summary
        print(f"result:     {s['ok']} ok, {s['errors']} errors, {s['skipped']} skipped as "
              f"done, {s['seconds']:.1f} s")
    return 0


def cmd_jobs_logs(args) -> int:
    address, _ = _where(args)
    if not address:
        raise SgarcError("local runs log to the terminal (or, when scheduled, to the "
                         "scheduler's logs/ folder); `sgarc jobs logs` reads cluster jobs: "
                         "give --address")
    client = job_client(address)
    if args.follow:
        status = follow_logs(client, args.job_id)
        print(f"job {args.job_id}: {status}")
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def cmd_jobs_cancel(args) -> int:
    address, _ = _where(args)
    if not address:
        raise SgarcError("a local run stops with Ctrl-C (a scheduled one: `kill` the PID in "
                         "the scheduler's lock file); `sgarc jobs cancel` stops cluster jobs: "
                         "give --address")
    stopped = job_client(address).stop_job(args.job_id)
    print(f"job {args.job_id}: {'stopping' if stopped else 'not running (nothing to stop)'}")
    return 0


def _ms(epoch_ms: int | None) -> str:
    if not epoch_ms:
        return "-"
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.submit ARGS`` is ``sgarc submit ARGS``."""
    from jobs.cli import run_as
    return run_as("submit", argv)


if __name__ == "__main__":
    sys.exit(main())
