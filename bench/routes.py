"""Archive routes on the validation sets: bytes stored against the source, per quality floor.

    nice python bench/routes.py                          # bsds500/val, wikipedia-photos/val
    nice python bench/routes.py --limit 4 --json r.json  # a quick look, per-image JSON

For every image, model and floor, the route codec.routes chooses (learned, jpeg-lossless,
original) with amortized learned encodings of each model in --models: a fixed-rate model
(one encoding per image, its one point, judged against each floor) or a variable-rate one,
such as the default `msh-vr6` (per floor, the lowest rate point reaching it, as
`Codec.encode_to_target` searches; without a floor, its default point). Prints one row per
data set, model and floor: total stored bytes against the source, and the share of images
and of stored bytes per route; beside it, what storing every image learned would give
(the codec without guarantees). One process, one torch thread by default, so that it can
run beside other work (`nice`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/routes.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, cpu_model, log
from codec import routes
from codec.api import Codec, EncodeResult
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.registry import REGISTRY
from codec.targets import Target, encode_to_target

DATA = (ROOT.parent / "shared/data/bsds500/val", ROOT.parent / "shared/data/wikipedia-photos/val")
FLOORS = (None, 30.0, 34.0, 38.0)
AMORTIZED = InferenceConfig(method="amortized")
ROUTES = ("learned", "jpeg-lossless", "original")


class _Remembering:
    """A variable-rate codec that remembers its amortized encodings of one image by rate
    point, so that the searches for several floors share their bisection points."""

    def __init__(self, codec: Codec) -> None:
        self.codec, self.lm = codec, codec.lm
        self.done: dict[int, EncodeResult] = {}

    def at_rate(self, rate: int) -> _AtRate:
        return _AtRate(self, rate)


@dataclass
class _AtRate:
    owner: _Remembering
    rate: int

    def encode(self, image, config, progress=None) -> EncodeResult:
        if self.rate not in self.owner.done:
            self.owner.done[self.rate] = self.owner.codec.at_rate(self.rate).encode(image,
                                                                                   config)
        return self.owner.done[self.rate]


def learned_attempts(codec: Codec, image, floors) -> dict[float | None, EncodeResult]:
    """The learned encoding routes.encode would try for each floor."""
    if codec.lm.variable is None:
        one = codec.encode(image, AMORTIZED)
        return dict.fromkeys(floors, one)
    memo = _Remembering(codec)
    out = {}
    for floor in floors:
        if floor is None:
            out[floor] = codec.encode(image, AMORTIZED)
        else:
            out[floor] = encode_to_target(memo, image, Target("psnr", floor), AMORTIZED)
    return out


def measure(folder: Path, model: str, floors, limit: int | None, registry) -> list[dict]:
    """One record per image and floor: its route, bytes and the learned attempt."""
    codec = Codec(model, device="cpu", registry=registry)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    records = []
    for i, path in enumerate(files[:limit]):
        t0 = time.perf_counter()
        source = path.read_bytes()
        image = load_image(source, name=path.name)
        attempts = learned_attempts(codec, image, floors)
        for floor in floors:
            learned = attempts[floor]
            r = routes.choose(image, source, learned, routes.Policy(floor))
            records.append({"data": folder.parent.name + "/" + folder.name, "model": codec.model_id,
                            "image": path.name, "floor": floor, "route": r.route,
                            "source_bytes": len(source), "stored_bytes": len(r.data),
                            "learned_bytes": len(learned.data), "learned_psnr": learned.psnr,
                            "learned_rate": learned.rate})
        log(f"{codec.model_id} {path.name} ({i + 1}/{len(files[:limit])}): "
            + ", ".join(f"{f or 'none'}: {rec['route']}" for f, rec in
                        zip(floors, records[-len(floors):], strict=True))
            + f" ({time.perf_counter() - t0:.1f} s)")
    return records


def table(records: list[dict]) -> list[dict]:
    """Totals per data set, model and floor."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["data"], r["model"], r["floor"]), []).append(r)
    rows = []
    for (data, model, floor), rs in groups.items():
        src = sum(r["source_bytes"] for r in rs)
        stored = sum(r["stored_bytes"] for r in rs)
        row = {"data": data, "model": model, "floor": floor, "images": len(rs),
               "source_bytes": src, "stored_bytes": stored, "stored_share": stored / src,
               "learned_share": sum(r["learned_bytes"] for r in rs) / src,
               "learned_psnr": sum(r["learned_psnr"] for r in rs) / len(rs)}
        for route in ROUTES:
            mine = [r for r in rs if r["route"] == route]
            row[route] = (len(mine) / len(rs), sum(r["stored_bytes"] for r in mine) / stored)
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    head = ("| data | model | floor | images | source | stored | stored / source | learned "
            "| jpeg-lossless | original | all learned: bytes / source, mean PSNR |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        floor = "none" if r["floor"] is None else f"{r['floor']:g} dB"
        shares = [f"{100 * r[k][0]:.0f}% / {100 * r[k][1]:.0f}%" for k in ROUTES]
        lines.append(f"| {r['data']} | {r['model']} | {floor} | {r['images']} | "
                     f"{r['source_bytes'] / 1e6:.2f} MB | {r['stored_bytes'] / 1e6:.2f} MB | "
                     f"{100 * r['stored_share']:.1f}% | " + " | ".join(shares)
                     + f" | {100 * r['learned_share']:.1f}%, {r['learned_psnr']:.2f} dB |")
    lines.append("")
    lines.append("Route columns: share of the images / share of the stored bytes.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", type=Path, default=None,
                   help="image folder (repeatable; default: bsds500/val, wikipedia-photos/val)")
    p.add_argument("--models", default="default",
                   help="comma-separated model ids; 'default' is the shipped default")
    p.add_argument("--floors", default="none,30,34,38", help="PSNR floors in dB, or none")
    p.add_argument("--limit", type=int, default=None, help="images per folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--registry", type=Path, default=REGISTRY, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="write rows and records here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    floors = [None if f == "none" else float(f) for f in args.floors.split(",")]
    records = []
    for folder in args.data or DATA:
        for model in args.models.split(","):
            records += measure(folder, None if model == "default" else model, floors,
                               args.limit, args.registry)
    rows = table(records)
    print(render(rows))
    print(f"\n(amortized learned encodings, CPU: {cpu_model()}, {args.threads} torch thread(s))")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
