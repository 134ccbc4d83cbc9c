"""The benchmark suite: one table of the performance issue's numbers, each beside its floor.

    python -m bench                          # from the repo root; CUDA for SGA when present
    python -m bench --quick --skip pipeline  # a smoke test: few repeats, no Ray
    python -m bench --device cpu --json out.json

Rows: decode on the CPU (ms per 768x512 image) and its entropy-decoding share; amortized
encode; one SGA iteration per image (on CUDA timed on a batch of --sga-batch images); SGA
images per hour at 2000 iterations; the pipeline's steady-state throughput over a bare
loop's; one training step of the variable-rate model (bench/train_step.py). Each time is
shown beside its floor (the network's FLOPs over the device's measured peak,
bench/codec_speed.py) and the issue's target beside the measured value. Everything,
with the machine, the full codec_speed reports and the pipeline numbers, goes to --json.
This is a tool, not a test: no target is enforced (the exit status is 0 either way).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import codec_speed, pipeline_overhead, plan_scale, train_step
from bench.common import ROOT, busy_cpus, cpu_model, log, machine_info
from codec.registry import REGISTRY

SECTIONS = ("decode", "encode", "sga", "pipeline", "train")
OPTIONAL = ("plan_scale",)  # run only when named in --only (minutes, GBs of disk)
SGA_ITERATIONS = 2000  # the paper's budget, the yardstick (sgarc encode defaults to 1000)
TARGET_IMAGES_PER_HOUR = 2000  # per H100, 768x512 at 2000 iterations
TARGET_DECODE_RATIO = 1.5  # decode on the 2-core CPU at most 1.5x its floor
TARGET_ENTROPY_SHARE = 15.0  # entropy decoding at most 15% of decode time


@dataclass
class SummaryRow:
    """One line of the summary; ratio = measured time / floor time (1.0 = at the floor)."""

    key: str
    name: str
    unit: str
    measured: float
    floor: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None  # None: no target, or not applicable on this device
    note: str = ""


# ---------------------------------------------------------------------------- options


def sections(text: str) -> set[str]:
    names = {s.strip() for s in text.split(",") if s.strip()}
    unknown = names - set(SECTIONS) - set(OPTIONAL)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(SECTIONS + OPTIONAL)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for amortized encode and SGA (default: cuda when present, "
                        "else cpu); decode is always measured on the CPU")
    p.add_argument("--quick", action="store_true",
                   help="few repeats, small pipeline run: a smoke test, not numbers to quote")
    p.add_argument("--json", type=Path, default=None,
                   help="write everything here (default runs/bench/bench-<time>.json)")
    p.add_argument("--only", type=sections, default=None, metavar="SECTIONS",
                   help=f"comma-separated sections to run ({','.join(SECTIONS)}; default all; "
                        f"optional: {','.join(OPTIONAL)}, archive-scale planning)")
    p.add_argument("--skip", type=sections, default=set(), metavar="SECTIONS",
                   help="comma-separated sections to leave out")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="model id (default: the registry's default model)")
    which.add_argument("--quality", type=int, help="quality level of a shipped model")
    p.add_argument("--registry", type=Path, default=REGISTRY,
                   help="registry.json to load the model from (tests point it at a tiny "
                        "model; the pipeline section needs the shipped registry)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the codec timings (default: torch's default)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per codec measurement (default 5, --quick 2)")
    p.add_argument("--sga-batch", type=int, default=None,
                   help="images per SGA batch (default 8 on CUDA, 1 on the CPU)")
    p.add_argument("--pipeline-images", type=int, default=None,
                   help="pipeline run sizes N and 3N (default 48, --quick 8)")
    args = p.parse_args(argv)
    args.sections = (args.only if args.only is not None else set(SECTIONS)) - args.skip
    if not args.sections:
        p.error("--only / --skip leave no section to run")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if "pipeline" in args.sections and args.registry.resolve() != REGISTRY.resolve():
        p.error("the pipeline loads shipped models only: use --skip pipeline with --registry")
    for name in ("threads", "repeats", "sga_batch", "pipeline_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def speed_settings(args: argparse.Namespace, device: str, sga: bool) -> codec_speed.SpeedSettings:
    """codec_speed's settings for one device: full, or quick (fewer repeats, small GEMMs)."""
    cuda = torch.device(device).type == "cuda"
    batch = args.sga_batch or (8 if cuda else 1)
    model = args.model if args.model is not None else args.quality
    if args.quick:
        return codec_speed.SpeedSettings(
            model=model, registry=args.registry, device=device, threads=args.threads,
            repeats=args.repeats or 2, sga=sga, sga_iterations=3, sga_repeats=1,
            sga_batch=batch, gemm_size=4096 if cuda else 1024, gemm_runs=2, flop_check=False)
    return codec_speed.SpeedSettings(
        model=model, registry=args.registry, device=device, threads=args.threads,
        repeats=args.repeats or 5, sga=sga, sga_batch=batch)


# ---------------------------------------------------------------------------- summary


def _row(report: dict, key: str) -> dict:
    return next(r for r in report["rows"] if r["key"] == key)


def summarize(cpu: dict | None, dev: dict | None, pipe: dict | None,
              wanted: set[str], train: dict | None = None) -> list[SummaryRow]:
    """The summary rows from the codec_speed reports (cpu, and dev for --device), the
    pipeline numbers and the training step's."""
    rows: list[SummaryRow] = []
    if cpu is not None and "decode" in wanted:
        d, e = _row(cpu, "decode"), _row(cpu, "decode_entropy")
        share = 100 * e["measured_ms"] / d["measured_ms"]
        rows += [
            SummaryRow("decode_cpu_ms", "decode, cpu", "ms/image", d["measured_ms"],
                       d["floor_ms"], d["ratio"], f"<= {TARGET_DECODE_RATIO:g}x floor",
                       d["ratio"] <= TARGET_DECODE_RATIO),
            SummaryRow("decode_cpu_entropy_share", "  entropy decoding share", "%", share,
                       target=f"<= {TARGET_ENTROPY_SHARE:g}%",
                       met=share <= TARGET_ENTROPY_SHARE,
                       note=f"{e['measured_ms']:.2f} ms"),
        ]
    if "encode" in wanted:
        for report in (cpu, dev):
            if report is None:
                continue
            r, where = _row(report, "encode"), report["machine"]["device"]
            rows.append(SummaryRow(f"encode_{where}_ms", f"amortized encode, {where}",
                                   "ms/image", r["measured_ms"], r["floor_ms"], r["ratio"]))
    sga_report = dev if dev is not None else cpu
    if sga_report is not None and "sga" in wanted:
        it, enc = _row(sga_report, "sga_iteration"), _row(sga_report, "encode")
        where = sga_report["machine"]["device"]
        batch = sga_report["settings"]["sga_batch"]
        rows.append(SummaryRow("sga_iteration_ms", f"SGA iteration, {where}, batch {batch}",
                               "ms/image", it["measured_ms"], it["floor_ms"], it["ratio"]))
        per_image_ms = enc["measured_ms"] + SGA_ITERATIONS * it["measured_ms"]
        floor_ms = enc["floor_ms"] + SGA_ITERATIONS * it["floor_ms"]
        rate = 3.6e6 / per_image_ms
        cuda = torch.device(where).type == "cuda"
        rows.append(SummaryRow(
            "sga_images_per_hour", f"SGA images/hour at {SGA_ITERATIONS} it, {where}",
            "images/h", rate, 3.6e6 / floor_ms, per_image_ms / floor_ms,
            f">= {TARGET_IMAGES_PER_HOUR} per H100",
            rate >= TARGET_IMAGES_PER_HOUR if cuda else None,
            f"{per_image_ms / 1e3:.1f} s/image"
            + (f" on {sga_report['machine']['device_name']}" if cuda else "")))
    if pipe is not None:
        rows.append(SummaryRow(
            "pipeline_marginal_ratio", "pipeline / bare loop, images/s", "ratio",
            pipe["marginal_ratio"], target=f">= {pipe['target_marginal_ratio']:g}",
            met=pipe["marginal_ratio"] >= pipe["target_marginal_ratio"],
            note=f"marginal; end to end {pipe['end_to_end_ratio']:.2f}"))
    if train is not None:
        st = train["settings"]
        by = {r["variant"]: r for r in train["rows"]}
        used = by["channels_last"]  # what sgarc train runs by default
        bf16 = by.get("channels_last+bf16")
        rows.append(SummaryRow(
            "train_step_ms", f"training step, {st['device']}, batch {st['batch_size']}x"
            f"{st['crop']}px", "ms/step", used["measured_ms"], used["floor_ms"], used["ratio"],
            f"<= {train['target_ratio']:g}x floor", used["ratio"] <= train["target_ratio"],
            f"channels_last; nchw {by['nchw']['ratio']:.2f}x"
            + (f", --bf16 {bf16['ratio']:.2f}x" if bf16 else "")))
    return rows


def scale_rows(scale: dict | None) -> list[SummaryRow]:
    """plan_scale's largest local archive: plan time, its peak RSS, the metrics summary."""
    local = [r for r in (scale or {}).get("results", []) if r["label"].startswith("local")]
    if not local:
        return []
    r = max(local, key=lambda x: x["objects"])
    n = f"{r['objects'] / 1e6:g} M" if r["objects"] >= 1e6 else f"{r['objects'] / 1e3:g} k"
    t, rss, summ = r["plan"]["seconds"], r["plan"]["peak_rss_mib"], r["summary"]["seconds"]
    return [SummaryRow("plan_seconds", f"plan {n} objects, half done", "s", t,
                       target=f"<= {plan_scale.TARGET_SECONDS_1M:g} s at 1 M",
                       met=t <= plan_scale.TARGET_SECONDS_1M if r["objects"] >= 1e6 else None,
                       note=f"over small parts {r['plan_parts']['seconds']:.1f} s"),
            SummaryRow("plan_peak_rss", "  its peak RSS", "MiB", rss,
                       target=f"<= {plan_scale.TARGET_RSS_GIB * 1024:g} MiB",
                       met=rss <= plan_scale.TARGET_RSS_GIB * 1024),
            SummaryRow("metrics_summary_seconds", f"sgarc metrics summary, {n} rows", "s", summ,
                       target=f"<= {plan_scale.TARGET_SUMMARY_S:g} s",
                       met=summ <= plan_scale.TARGET_SUMMARY_S)]


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"


def format_summary(rows: list[SummaryRow]) -> str:
    """The summary as a text table."""
    width = max(len(r.name) for r in rows) + 2
    head = (f"{'':<{width}}{'unit':<10}{'measured':>10}{'floor':>10}{'measured/floor':>16}"
            f"  {'target':<20}{'met':<5}note")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.1f}x"
        met = "-" if r.met is None else ("yes" if r.met else "no")
        lines.append(f"{r.name:<{width}}{r.unit:<10}{_num(r.measured):>10}{_num(r.floor):>10}"
                     f"{ratio:>16}  {r.target or '-':<20}{met:<5}"
                     + (f"{r.note}" if r.note else "").rstrip())
    return "\n".join(line.rstrip() for line in lines)


def suite_notes(cpu: dict | None, dev: dict | None, wanted: set[str], quick: bool) -> list[str]:
    """What the rows mean and how far to trust them, for the rows that ran."""
    reports = [r for r in (cpu, dev) if r is not None]
    notes = []
    if reports:
        notes.append("floor = the network's FLOPs / the device's measured peak "
                     "(bench/codec_speed.py); measured/floor = how many times slower than that "
                     "arithmetic at peak rate.")
    for report in reports:
        peaks = report["peak_gflops"]
        notes.append(f"floor peak on {report['machine']['device']}: {peaks['fp32']:.1f} "
                     f"GFLOP/s = {peaks['fp32_source']}"
                     + (f"; bf16 torch.mm {peaks['bf16_gemm']:.1f} GFLOP/s, not used"
                        if "bf16_gemm" in peaks else ""))
    if "sga" in wanted and reports:
        notes.append(f"SGA images/hour = 3600 s / (amortized encode + {SGA_ITERATIONS} x SGA "
                     "iteration), both per image on the SGA device (the iteration from a batch "
                     "on CUDA); its floor column is the rate at the floors (an upper bound), "
                     "measured/floor compares times. The target is per H100: on a CPU it is "
                     "shown for scale only.")
    if "decode" in wanted and cpu is not None:
        notes.append(f"decode targets (issue): <= {TARGET_DECODE_RATIO:g}x floor on the 2-core "
                     f"CPU, entropy decoding <= {TARGET_ENTROPY_SHARE:g}% of decode.")
    if "train" in wanted:
        notes.append("training step: forward, backward and Adam of the variable-rate model "
                     "(bench/train_step.py); floor = its FLOPs (flop_counter) / the fp32 peak; "
                     "target (issue): <= 2x floor on the 2-core CPU.")
    if "pipeline" in wanted:
        notes.append("pipeline: steady-state images/s through Ray actors over a bare loop's on "
                     "the same JPEGs (bench/pipeline_overhead.py), amortized, CPU; no FLOP "
                     "floor.")
    notes.append("no target is enforced: 'met' only reads the numbers above.")
    if any((r["machine"]["busy_cpus_other_processes_at_start"] or 0) > 0.5 for r in reports):
        notes.append("WARNING: other processes kept CPUs busy at the start: timings are "
                     "contended (see the codec_speed headers in the JSON).")
    if quick:
        notes.append("--quick: few repeats and a small pipeline run; for smoke tests, not for "
                     "numbers to quote.")
    return notes


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted, device = args.sections, args.device
    cuda = torch.device(device).type == "cuda"
    started = dt.datetime.now(dt.UTC)
    busy = busy_cpus()

    cpu = dev = pipe = None
    if {"decode", "encode"} & wanted or ("sga" in wanted and not cuda):
        log("codec on the cpu ...")
        cpu = codec_speed.measure(speed_settings(args, "cpu", sga="sga" in wanted and not cuda))
    if cuda and {"encode", "sga"} & wanted:
        log(f"codec on {device} ...")
        dev = codec_speed.measure(speed_settings(args, device, sga="sga" in wanted))
    scale = None
    if "plan_scale" in wanted:
        log("planning at archive scale (bench/plan_scale.py) ...")
        with tempfile.TemporaryDirectory(prefix="sgarc-plan-scale-") as work:
            scale = plan_scale.measure(
                [10_000, 100_000] if args.quick else [100_000, 1_000_000],
                0 if args.quick else 100_000, Path(work),
                None if args.quick else plan_scale.BEFORE)
    if "pipeline" in wanted:
        log("pipeline overhead ...")
        model = args.model if args.model is not None else args.quality
        n = args.pipeline_images or (8 if args.quick else 48)
        pipe = pipeline_overhead.measure(images=n, repeats=1 if args.quick else 2,
                                         quality=model)

    train = None
    if "train" in wanted:
        log("training step ...")
        train = train_step.measure(train_step.StepSettings(
            threads=args.threads, device=device,
            repeats=args.repeats or (1 if args.quick else 5),
            **({"batch_size": 2, "crop": 64, "gemm_size": 1024, "gemm_runs": 2}
               if args.quick else {})))

    rows = summarize(cpu, dev, pipe, wanted, train) + scale_rows(scale)
    notes = suite_notes(cpu, dev, wanted, args.quick)
    first = cpu or dev
    machine = machine_info(busy) | {"threads": args.threads or torch.get_num_threads()}
    header = [f"sgarc bench ({'quick' if args.quick else 'full'}), {started:%Y-%m-%d %H:%M} UTC",
              f"machine: {cpu_model()}, {machine['logical_cpus']} logical CPUs "
              f"({'?' if busy is None else f'{busy:.1f}'} busy with other work at start), "
              f"torch {torch.__version__}"
              + (f", {machine['cuda']['device']}" if "cuda" in machine else ", no CUDA")]
    if first is not None:
        m = first["model"]
        header.append(f"model: {m['id']} (quality {m['quality']}, N={m['N']}, M={m['M']}); "
                      f"image {first['image']['width']}x{first['image']['height']}, "
                      f"{first['image']['source']}")
    print("\n".join(header) + "\n\n" + format_summary(rows) + "\n\n" + "\n".join(notes),
          flush=True)

    path = args.json or ROOT / "runs" / "bench" / f"bench-{started:%Y%m%d-%H%M%S}.json"
    report = {
        "suite": "python -m bench", "created": started.isoformat(),
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick, "device": device, "sections": sorted(wanted),
        "machine": machine, "model": None if first is None else first["model"],
        "targets": {"decode_ratio_max": TARGET_DECODE_RATIO,
                    "decode_entropy_share_max_percent": TARGET_ENTROPY_SHARE,
                    "sga_images_per_hour_min_per_h100": TARGET_IMAGES_PER_HOUR,
                    "sga_iterations": SGA_ITERATIONS,
                    "pipeline_marginal_ratio_min": pipeline_overhead.TARGET_RATIO},
        "summary": [asdict(r) for r in rows], "notes": notes,
        "codec_speed": {r["machine"]["device"]: r for r in (cpu, dev) if r is not None},
        "pipeline_overhead": pipe, "train_step": train, "plan_scale": scale,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
