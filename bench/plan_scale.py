"""Planning at archive scale: plan time, peak RSS, compaction and `sgarc metrics` at 1 M objects.

Synthetic archives, half of each already done by an earlier run (one metrics part of 16
rows per shard, as runs write them, every other image so done and new interleave):

* local storage at 100 k and 1 M objects (empty files in folders of 1,000);
* the moto S3 server (tests/s3server.py) at 100 k objects, through s3fs.

Each step runs in a fresh process that reports its own peak RSS (VmHWM), so one
step's memory never hides in another's. Steps: plan with the small parts (the state right
after runs), compact them (`pipeline.sink.compact`), plan again, and the `sgarc metrics`
summary (per-run and per-route tables, worst images, failures) over all N rows once the
other half is done too. The planner before this change (`pipeline/` at --before, loaded
with `git show`: one listing in memory, the parts read one by one, one plan.json) is
measured in the same run on the same archives as the baseline. The 10 M figures are
linear extrapolations from 100 k and 1 M.

    python bench/plan_scale.py [--sizes 100000,1000000] [--s3 100000] [--work DIR]
    python -m bench --only plan_scale          # the suite's optional section

Targets (issue 12, 2-core machine): 1 M planned in <= 60 s at <= 1 GiB peak RSS, peak
RSS nearly flat from 100 k to 1 M, the metrics summary over 1 M rows in <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "73338d5"  # pipeline/ before plans became Parquet manifests
FINGERPRINT = "bench-plan-scale"
SETTINGS = {"model": "bench", "method": "amortized", "iterations": 0, "quality": 0,
            "lmbda": 0.0}
SHARD = 16  # RunOptions' default shard size
TARGET_SECONDS_1M, TARGET_RSS_GIB, TARGET_SUMMARY_S = 60.0, 1.0, 5.0


def log(msg: str) -> None:
    print(f"[plan_scale] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- archives


def make_local(root: Path, n: int) -> None:
    """n empty .jpg files in folders of 1,000 (kept between runs: the marker says n)."""
    marker = root / ".bench-objects"
    if marker.exists() and marker.read_text() == str(n):
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        if i % 1000 == 0:
            folder = root / f"d{i // 1000:04d}"
            folder.mkdir(parents=True)
        os.close(os.open(folder / f"img{i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.write_text(str(n))


def done_table(objects: list, run_id: str):
    """Metrics rows (the full schema, plausible values) for these (key, size, version)."""
    import pyarrow as pa

    from pipeline import sink

    n = len(objects)
    keys = [k for k, _, _ in objects]
    cols = {
        "source_key": keys, "source_url": [f"s3://photos/{k}" for k in keys],
        "source_bytes": [s for _, s, _ in objects], "source_version": [v for _, _, v in objects],
        "source_format": ["JPEG"] * n, "source_mode": ["RGB"] * n,
        "width": [768] * n, "height": [512] * n, "metadata_bytes": [0] * n,
        "has_icc": [False] * n, "bitstream_key": [f"bitstreams/{k}.sga" for k in keys],
        "bitstream_bytes": [20_000 + i % 5000 for i in range(n)],
        "bitstream_sha256": [f"{i:064x}" for i in range(n)],
        "bpp": [0.4 + (i % 100) / 1000 for i in range(n)],
        "psnr": [30 + (i % 97) / 10 for i in range(n)], "route": ["learned"] * n,
        "model_id": ["bench"] * n, "method": ["amortized"] * n, "iterations": [0] * n,
        "encode_seconds": [0.2] * n, "device": ["cpu"] * n, "run_id": [run_id] * n,
        "shard_id": [f"{i // SHARD:016x}" for i in range(n)],
        "fingerprint": [FINGERPRINT] * n, "status": ["ok"] * n,
    }
    cols["timestamp"] = pa.array([sink.now()] * n, pa.timestamp("us", tz="UTC"))
    return sink.conform(pa.table(cols))


def write_parts(storage, objects: list, run_id: str, shard: int = SHARD) -> int:
    """One part per `shard` rows, as a run writes them (in threads for object stores)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from pipeline import sink

    table = done_table(objects, run_id)

    def one(start: int) -> None:
        part = table.slice(start, shard)
        key = sink.part_key(run_id, part["shard_id"][0].as_py())
        if storage.protocol == "file":  # setup, not the run: no fsync per part
            path = Path(storage.full_path(key))
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, path, compression="zstd")
            return
        buf = io.BytesIO()
        pq.write_table(part, buf, compression="zstd")
        storage.write_atomic(key, buf.getvalue())

    with ThreadPoolExecutor(1 if storage.protocol == "file" else 16) as pool:
        list(pool.map(one, range(0, len(objects), shard)))
    return -(-len(objects) // shard)


def make_s3_input(server, bucket: str, n: int) -> None:
    """n small objects in s3://bucket/in/, in folders of 1,000, put in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    client = server.client()

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"in/d{i // 1000:04d}/img{i:07d}.jpg", Body=b"x")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))


# ---------------------------------------------------------------------------- steps (children)


def _peak_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage: Linux keeps ru_maxrss across fork and
    exec, so a child would report at least the parent's peak (the bench's own 1 M listing,
    about 1 GiB, floored every 1 M step at 1000 MiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(name: str, a: dict) -> dict:
    """One measured step, in this (fresh) process."""
    from pipeline.storage import Storage

    options = a.get("options")
    t0 = time.perf_counter()
    if name == "plan":
        from pipeline.plan import make_plan

        src, out = Storage(a["input"], options), Storage(a["output"], options)
        plan = make_plan(src.iter_images(), src.url, out, SETTINGS, FINGERPRINT, SHARD)
        result = {"images": plan.num_images, "skipped": plan.skipped, "shards": plan.num_shards,
                  "plan_files": len(plan.manifests) + 1}
    elif name == "plan-before":  # `pipeline` here is the package as of --before
        from pipeline.plan import make_plan, plan_key

        src, out = Storage(a["input"], options), Storage(a["output"], options)
        plan = make_plan(src.list_images(), src.url, out, SETTINGS, FINGERPRINT, SHARD)
        data = plan.to_json()
        out.write_atomic(plan_key(plan.run_id), data)
        result = {"images": plan.num_images, "skipped": plan.skipped,
                  "shards": len(plan.shards), "plan_json_mib": len(data) / 2 ** 20}
    elif name == "compact":
        from pipeline import sink

        parts, rows = sink.compact(Storage(a["output"], options), a["run"])
        result = {"parts": parts, "rows": rows}
    elif name == "summary":
        from jobs import metrics

        con = metrics.connect(a["output"], options)
        runs = metrics.run_summaries(con)
        metrics.route_summaries(con)
        metrics.worst_images(con, n=10)
        metrics.failures(con, n=10)
        con.close()
        result = {"rows": sum(r["images"] for r in runs)}
    else:
        raise ValueError(name)
    return {**result, "seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_mib()}


def run_step(name: str, args: dict, before: Path | None = None) -> dict:
    """`step` in a fresh Python process; `before`: the old `pipeline` package first on the
    path."""
    env = dict(os.environ)
    path = [str(ROOT)] if before is None else [str(before), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    code = ("import json, sys; from bench.plan_scale import step; "
            "print(json.dumps(step(sys.argv[1], json.loads(sys.argv[2]))))")
    done = subprocess.run(["nice", "-n", "5", sys.executable, "-c", code, name,
                           json.dumps(args)], env=env, cwd=before or ROOT, text=True,
                          capture_output=True)
    if done.returncode:
        raise RuntimeError(f"step {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def old_pipeline(commit: str, folder: Path) -> Path:
    """`pipeline/` as of `commit`, written under folder (a package of its own)."""
    pkg = folder / "pipeline"
    pkg.mkdir(parents=True, exist_ok=True)
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{commit}:pipeline"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.split()
    for name in listing:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{commit}:pipeline/{name}"], cwd=ROOT,
                                  check=True, capture_output=True, text=True).stdout
            (pkg / name).write_text(text)
    return folder


# ---------------------------------------------------------------------------- scenarios


def scenario(label: str, input_url: str, output_url: str, options: dict | None,
             objects: list, before: Path | None, storage_factory) -> dict:
    """Half done -> plan (small parts) -> compact -> plan -> all done -> metrics summary."""
    out = storage_factory(output_url)
    half = objects[::2]
    log(f"{label}: writing {len(half):,} done rows as {-(-len(half) // SHARD):,} parts ...")
    t0 = time.perf_counter()
    write_parts(out, half, "done-1")
    log(f"{label}: parts written in {time.perf_counter() - t0:.0f} s")
    base = {"input": input_url, "output": output_url, "options": options}
    r: dict = {"label": label, "objects": len(objects), "done": len(half)}
    if before is not None:
        log(f"{label}: planning, before ...")
        r["before"] = run_step("plan-before", base, before)
    log(f"{label}: planning over the parts ...")
    r["plan_parts"] = run_step("plan", base)
    log(f"{label}: compacting ...")
    r["compact"] = run_step("compact", {**base, "run": "done-1"})
    log(f"{label}: planning over the compacted file(s) ...")
    r["plan"] = run_step("plan", base)
    rest = objects[1::2]
    write_parts(out, rest, "done-2", shard=50_000)  # the other half, few big parts
    log(f"{label}: metrics summary over {len(objects):,} rows ...")
    r["summary"] = run_step("summary", base)
    return r


def measure(sizes: list[int], s3_objects: int, work: Path, before: str | None) -> dict:
    from pipeline.storage import Storage

    old = old_pipeline(before, work / "before") if before else None
    results = []
    for n in sizes:
        src = work / f"local-{n}" / "in"
        log(f"local {n:,}: creating the archive ...")
        make_local(src, n)
        out = work / f"local-{n}" / "out"
        shutil.rmtree(out, ignore_errors=True)
        objects = sorted((o.key, o.size, o.version) for o in Storage(str(src)).iter_images())
        results.append(scenario(f"local {n:,}", str(src), str(out), None, objects, old,
                                Storage))
    if s3_objects:
        sys.path.insert(0, str(ROOT))
        from tests.s3server import s3_server

        with s3_server() as server:
            bucket = server.create_bucket()
            log(f"s3 {s3_objects:,}: putting the objects ...")
            make_s3_input(server, bucket, s3_objects)
            options = server.storage_options()
            src = Storage(f"s3://{bucket}/in", options)
            objects = sorted((o.key, o.size, o.version) for o in src.iter_images())
            results.append(scenario(f"s3 (moto) {s3_objects:,}", src.url, f"s3://{bucket}/out",
                                    options, objects, old,
                                    lambda url: Storage(url, options)))
    return {"before": before, "results": results, "extrapolated": extrapolate(results)}


def extrapolate(results: list[dict]) -> dict | None:
    """10 M from the two largest local sizes, linearly (seconds and peak RSS)."""
    local = sorted((r for r in results if r["label"].startswith("local")),
                   key=lambda r: r["objects"])
    if len(local) < 2:
        return None
    a, b = local[-2], local[-1]

    def line(get) -> float:  # no less than at the larger size: noise is not a saving
        slope = max(0.0, (get(b) - get(a)) / (b["objects"] - a["objects"]))
        return get(b) + slope * (10_000_000 - b["objects"])

    return {"plan_seconds": line(lambda r: r["plan"]["seconds"]),
            "plan_parts_seconds": line(lambda r: r["plan_parts"]["seconds"]),
            "plan_peak_rss_mib": line(lambda r: r["plan"]["peak_rss_mib"]),
            "summary_seconds": line(lambda r: r["summary"]["seconds"])}


def format_report(report: dict) -> str:
    head = (f"{'archive':<18}{'step':<26}{'seconds':>9}{'peak RSS MiB':>14}"
            f"{'vs before':>11}  notes")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        before = r.get("before")

        def row(step: str, m: dict, note: str = "", vs: str = "", label=r["label"]) -> None:
            lines.append(f"{label:<18}{step:<26}{m['seconds']:>9.1f}"
                         f"{m['peak_rss_mib']:>14.0f}{vs:>11}  {note}")

        if before:
            row("plan, before", before, f"plan.json {before['plan_json_mib']:.1f} MiB")
        for key, name in (("plan_parts", "plan (small parts)"), ("plan", "plan (compacted)")):
            m = r[key]
            vs = f"{before['seconds'] / m['seconds']:.1f}x" if before else ""
            row(name, m, f"{m['images']:,} to encode in {m['shards']:,} shards, "
                f"{m['skipped']:,} skipped; {m['plan_files']} plan files", vs)
        c = r["compact"]
        row("compact", c, f"{c['parts']:,} parts, {c['rows']:,} rows")
        row("metrics summary", r["summary"], f"{r['summary']['rows']:,} rows")
    e = report["extrapolated"]
    if e:
        lines += ["", f"extrapolated to 10 M (linear from the two local sizes): plan "
                  f"{e['plan_seconds']:.0f} s ({e['plan_parts_seconds']:.0f} s over small "
                  f"parts), peak RSS {e['plan_peak_rss_mib']:.0f} MiB, metrics summary "
                  f"{e['summary_seconds']:.1f} s"]
    return "\n".join(lines)


def targets(report: dict) -> list[str]:
    """The issue's targets against the 1 M local numbers (read only; nothing enforced)."""
    big = [r for r in report["results"] if r["label"] == "local 1,000,000"]
    if not big:
        return []
    r = big[0]
    small = [x for x in report["results"] if x["label"] == "local 100,000"]
    out = [f"1 M planned in {r['plan']['seconds']:.1f} s (<= {TARGET_SECONDS_1M:.0f} s: "
           f"{'met' if r['plan']['seconds'] <= TARGET_SECONDS_1M else 'not met'}), over "
           f"small parts {r['plan_parts']['seconds']:.1f} s",
           f"peak RSS {r['plan']['peak_rss_mib']:.0f} MiB (<= {TARGET_RSS_GIB * 1024:.0f}: "
           f"{'met' if r['plan']['peak_rss_mib'] <= TARGET_RSS_GIB * 1024 else 'not met'})",
           f"metrics summary over {r['summary']['rows']:,} rows {r['summary']['seconds']:.1f} s "
           f"(<= {TARGET_SUMMARY_S:.0f} s: "
           f"{'met' if r['summary']['seconds'] <= TARGET_SUMMARY_S else 'not met'})"]
    if small:
        out.append(f"peak RSS 100 k -> 1 M: {small[0]['plan']['peak_rss_mib']:.0f} -> "
                   f"{r['plan']['peak_rss_mib']:.0f} MiB")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/plan_scale.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000",
                   help="local archive sizes, comma-separated (default 100000,1000000)")
    p.add_argument("--s3", type=int, default=100_000, help="objects on moto S3 (0: skip)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the archives, kept between runs (default: a temp dir)")
    p.add_argument("--before", default=BEFORE,
                   help=f"commit of the planner to compare with ({BEFORE}; '' to skip)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="sgarc-plan-scale-"))
    report = measure(sizes, args.s3, work, args.before or None)
    print(format_report(report))
    print("\n".join(["", *targets(report)]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
