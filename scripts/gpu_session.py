"""The GPU session's parts (scripts/gpu_session.sh runs them in order).

    python scripts/gpu_session.py pack                 # here: build .gpu/ (training pack)
    python scripts/gpu_session.py checks --out DIR     # there: the codec's GPU checks
    python scripts/gpu_session.py import DIR           # here: take the weights it brought back
    python scripts/gpu_session.py import DIR --retire msh-vr6=msh-vr-gpu1  # ... superseding

pack: 256x256 crops of ../shared/data/*/train (JPEG quality 95, 4:4:4; a fixed seed), at
most --max-mb megabytes and no more than the working tree leaves under the 64 MiB the device
tool sends (measured: `git ls-files`, tracked and untracked-not-ignored), 20 val images for
the checks, and the wheels the device's image lacks
(constriction; Ray is not there either, so the pipeline check runs the pipeline's shard
encoder without it).

checks, each on --device (cuda there; cpu for --smoke): GPU encode -> CPU decode of the val
images (the CPU decoder must recover exactly the latents the GPU inference produced, and
its pixels must be within one level of a GPU decode: docs/codec.md), SGA images per hour
at batch 8 and 16 (bench/codec_speed.py), and a pipeline run of one shard through the
pipeline's ShardEncoder on that device. Everything goes to DIR/checks.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACK = ROOT / ".gpu"
DATA = ROOT.parent / "shared" / "data"
CROP = 256


# ------------------------------------------------------------------------------- pack


TRAVEL_LIMIT = 64 * 2**20  # what the device tool sends: tracked + untracked-not-ignored + carry
TRAVEL_MARGIN = 2 * 2**20


def travelling_bytes() -> int:
    """Bytes of the working tree the device tool sends, less .gpu/ (git-ignored, carried)."""
    names = []
    for extra in ([], ["--others", "--exclude-standard"]):
        out = subprocess.run(["git", "ls-files", "-z", *extra], cwd=ROOT, check=True,
                             capture_output=True).stdout
        names += [n for n in out.decode().split("\0") if n]
    return sum((ROOT / n).stat().st_size for n in names if (ROOT / n).is_file())


def pack(max_mb: float, val_images: int, seed: int) -> None:
    """The val images and wheels first, then as many training crops as fit both --max-mb and
    the room the tree leaves under the device tool's 64 MiB."""
    import io

    import numpy as np
    from PIL import Image

    from codec.train import IMAGE_SUFFIXES

    if PACK.exists():
        shutil.rmtree(PACK)
    (PACK / "train").mkdir(parents=True)
    (PACK / "val").mkdir()
    (PACK / "wheels").mkdir()
    vals = sorted((DATA / "bsds500" / "val").glob("*.jpg"))[:val_images]
    for f in vals:
        shutil.copy(f, PACK / "val" / f.name)
    from importlib.metadata import version
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(PACK / "wheels"), f"constriction=={version('constriction')}"],
                   check=True)
    tree = travelling_bytes()
    fixed = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    room = TRAVEL_LIMIT - TRAVEL_MARGIN - tree - fixed
    if room < 2 * 2**20:
        raise SystemExit(f"the working tree ({tree / 2**20:.1f} MiB) leaves {room / 2**20:.1f} "
                         "MiB for training crops under the device tool's 64 MiB: compact "
                         "training/ (codec.train.compact_checkpoint) or commit less")
    files = sorted(p for d in sorted(DATA.glob("*/train")) for p in d.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)
    rng = random.Random(seed)
    budget, used, n = min(max_mb * 2**20, room), 0, 0
    order = files * 8  # several crops per image, images in turn
    rng.shuffle(order)
    for f in order:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if min(a.shape[:2]) < CROP:
            continue
        r, c = rng.randrange(a.shape[0] - CROP + 1), rng.randrange(a.shape[1] - CROP + 1)
        buf = io.BytesIO()
        Image.fromarray(a[r:r + CROP, c:c + CROP]).save(buf, "JPEG", quality=95, subsampling=0)
        if used + buf.tell() > budget:
            break
        (PACK / "train" / f"{n:05d}.jpg").write_bytes(buf.getvalue())
        used, n = used + buf.tell(), n + 1
    total = tree + fixed + used
    print(f"pack: {n} crops of {CROP}px ({used / 2**20:.1f} MB) from {len(files)} train "
          f"images, {len(vals)} val images, wheels {[p.name for p in (PACK / 'wheels').iterdir()]}"
          f"; with the tree ({tree / 2**20:.1f} MiB) {total / 2**20:.1f} of the 64 MiB travel")


# ----------------------------------------------------------------------------- checks


def _val(folder: Path, limit: int):
    from codec.images import load_image
    return [(p.name, load_image(p)) for p in sorted(folder.iterdir())[:limit]]


def check_cross_device(model: str, registry: Path, folder: Path, device: str,
                       limit: int, iterations: int) -> dict:
    """GPU inference -> stream -> CPU decoder: latents exactly, pixels within one level."""
    import numpy as np

    from codec.api import Codec, decode, decode_latents
    from codec.bitstream import parse
    from codec.inference import InferenceConfig

    codec = Codec(model, device=device, registry=registry)
    cfg = InferenceConfig(method="sga", iterations=iterations, schedule="scaled")
    rows = []
    for name, image in _val(folder, limit):
        lat, _ = codec._infer([image], cfg, None)
        result = codec._code_one(image, lat, 0, cfg, 0.0)
        z_hat, k, _ = decode_latents(parse(result.data), codec.lm)
        same = bool(np.array_equal(z_hat, lat.z_hat[0].cpu().numpy())
                    and np.array_equal(k, lat.k[0].cpu().numpy()))
        cpu = decode(result.data, device="cpu", registry=registry).rgb.astype(np.int16)
        dev = decode(result.data, device=device, registry=registry).rgb.astype(np.int16)
        diff = np.abs(cpu - dev)
        rows.append({"image": name, "latents_identical": same,
                     "max_pixel_diff": int(diff.max()),
                     "pixels_differing": float((diff > 0).mean()), "bpp": result.bpp,
                     "psnr": result.psnr})
    return {"device": device, "images": len(rows), "sga_iterations": cfg.iterations,
            "all_latents_identical": all(r["latents_identical"] for r in rows),
            "max_pixel_diff": max((r["max_pixel_diff"] for r in rows), default=0),
            "within_tolerance": all(r["max_pixel_diff"] <= 1 for r in rows), "rows": rows}


def check_sga_speed(model: str, registry: Path, device: str, batches: list[int],
                    iterations: int) -> dict:
    from bench import codec_speed

    out = {}
    for batch in batches:
        report = codec_speed.measure(codec_speed.SpeedSettings(
            model=model, registry=registry, device=device, sga_batch=batch,
            sga_iterations=iterations, repeats=2, flop_check=False,
            gemm_size=8192 if device == "cuda" else 1024, gemm_runs=2))
        rows = {r["key"]: r for r in report["rows"] if r.get("key")}
        per_image_ms = rows["encode"]["measured_ms"] + 2000 * rows["sga_iteration"]["measured_ms"]
        out[f"batch_{batch}"] = {"sga_iteration_ms_per_image": rows["sga_iteration"]["measured_ms"],
                                 "encode_ms": rows["encode"]["measured_ms"],
                                 "images_per_hour_at_2000_it": 3.6e6 / per_image_ms}
    return out


def check_pipeline(model: str, folder: Path, device: str, work: Path, limit: int,
                   iterations: int) -> dict:
    """One shard through the pipeline's encoder on `device` (Ray is not on the GPU image),
    with the shipped model: this measures the pipeline, not the new weights."""
    from pipeline.plan import Shard
    from pipeline.settings import EncodeSettings
    from pipeline.storage import Storage
    from pipeline.worker import ShardEncoder

    settings = EncodeSettings(model=model, method="sga", iterations=iterations)
    out = work / "archive"
    encoder = ShardEncoder(str(folder), str(out), None, settings, settings.fingerprint(),
                           device=device, batch_size=8 if device == "cuda" else 1)
    images = sorted(Storage(str(folder)).list_images(), key=lambda o: o.key)[:limit]
    t0 = time.perf_counter()
    result = encoder.process(Shard("gpu-check", images), "gpu-check")
    seconds = time.perf_counter() - t0
    return {"device": device, "images": result.images, "ok": result.ok,
            "errors": result.errors, "seconds": seconds, "sga_iterations": iterations,
            "images_per_hour": 3600 * result.images / seconds}


def checks(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    registry = Path(args.registry)
    report = {"device": device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    t0 = time.time()
    report["cross_device"] = check_cross_device(args.model, registry, Path(args.val), device,
                                                args.images, args.cross_iterations)
    print(f"cross-device: {report['cross_device']['images']} images, latents identical "
          f"{report['cross_device']['all_latents_identical']}, max pixel difference "
          f"{report['cross_device']['max_pixel_diff']}", flush=True)
    report["sga_speed"] = check_sga_speed(args.model, registry, device, args.batches,
                                          args.sga_iterations)
    print(f"SGA speed: {json.dumps(report['sga_speed'])}", flush=True)
    report["pipeline"] = check_pipeline(args.pipeline_model, Path(args.val), device,
                                        Path(args.work),
                                        args.images, args.pipeline_iterations)
    print(f"pipeline: {json.dumps(report['pipeline'])}", flush=True)
    report["seconds"] = time.time() - t0
    (out / "checks.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["cross_device"]["all_latents_identical"] else 1


# ----------------------------------------------------------------------------- import


def import_weights(folder: Path, retire: dict[str, str] | None = None) -> None:
    """Register the model files of a session's registry in the shipped registry, then
    re-pack the weights (`retire`: old id -> new id, encoders that no longer ship) and check
    that they stay within the budget of all shipped weights."""
    from dataclasses import asdict

    from codec import registry as reg

    entries = reg.entries(Path(folder) / "registry.json")
    for e in entries:
        src = Path(folder) / e.file
        if reg.sha256_of(src) != e.sha256:
            raise SystemExit(f"{src}: sha256 does not match its registry entry")
        shipped = {x.id: x for x in reg.entries()}
        if e.id in shipped and shipped[e.id].sha256 != e.sha256:
            raise SystemExit(f"model id {e.id} is shipped with other weights; streams name "
                             "it, so it keeps them: rerun the session with a new GPU_MODEL")
        shutil.copy(src, reg.WEIGHTS_DIR / e.file)
        known = [x for x in reg.entries() if x.id != e.id]
        models = sorted([*known, e], key=lambda x: x.quality)
        (reg.REGISTRY).write_text(json.dumps(
            {"models": [reg._as_json(x) for x in models]}, indent=2) + "\n")
        reg.load.cache_clear()
        print(f"imported {e.id} ({e.steps} steps) sha256 {e.sha256[:12]}… {asdict(e)['note']}")
    from codec.weight_store import over_budget_message, weight_bytes
    from codec.weight_store import pack as pack_weights
    pack_weights(reg.REGISTRY, retire)  # what the new files share with the shipped ones, once
    total = weight_bytes(reg.REGISTRY)
    message = over_budget_message(total)
    if message:
        raise SystemExit(f"{message}; `git checkout codec/weights` undoes this import")
    print(f"shipped weights: {total / 1e6:.2f} MB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--max-mb", type=float, default=15.0)
    a.add_argument("--val-images", type=int, default=20)
    a.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("checks")
    c.add_argument("--model", default="msh-vr6", help="the session's model (its registry)")
    c.add_argument("--pipeline-model", default="msh-vr6",
                   help="a shipped model for the pipeline check (it reads the shipped registry)")
    c.add_argument("--registry", required=True)
    c.add_argument("--val", default=str(PACK / "val"))
    c.add_argument("--images", type=int, default=20)
    c.add_argument("--device", default=None)
    c.add_argument("--batches", type=lambda t: [int(v) for v in t.split(",")], default=[8, 16])
    c.add_argument("--sga-iterations", type=int, default=20)
    c.add_argument("--cross-iterations", type=int, default=50,
                   help="SGA iterations of the cross-device check's encodes")
    c.add_argument("--pipeline-iterations", type=int, default=500)
    c.add_argument("--out", required=True)
    c.add_argument("--work", default="/tmp/sgarc-gpu-work")
    i = sub.add_parser("import")
    i.add_argument("folder")
    i.add_argument("--retire", action="append", default=[], metavar="OLD=NEW",
                   help="make model OLD decode-only, NEW encoding instead (when NEW beats it "
                        "on val: its encoder's bytes make room under the 40 MB)")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.max_mb, args.val_images, args.seed)
        return 0
    if args.cmd == "checks":
        return checks(args)
    from codec.errors import ModelError
    from codec.weight_store import parse_retire
    try:
        retire = parse_retire(args.retire)
    except ModelError as e:
        p.error(str(e))
    import_weights(Path(args.folder), retire)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
