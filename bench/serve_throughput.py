"""Decode service throughput: the server in the working tree against an earlier one, in one run.

Both servers run the same request handling code paths they ship with, each in its own
process, on the same archive; this process is the client: 16 threads, each with its own
keep-alive connection, send GET requests for a fixed time and count the 200s.

* **cached**: every client asks for the same PNG, cache on (after one warm-up request
  every answer is a cache hit): the cost of the HTTP layer itself;
* **uncached**: cache off, each client asks for its own image, so every request reads and
  decodes a stream (``--decoders`` at once): the cost of the HTTP layer next to decoding.

The earlier server is ``jobs/serve.py`` as of ``--before`` (default: the last commit on
``http.server``), loaded from ``git show`` into a temporary module, so both are measured
on the same machine at the same time. Rounds alternate (before, now, before, now, ...) and
the best round of each counts; the ratio now / before is printed (target: >= 1).

    python bench/serve_throughput.py [--seconds 3] [--rounds 2] [--clients 16] [--cases uncached]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE = "73338d5"  # the last commit with the decode service on http.server
SIZE = (192, 128)  # width, height of the test images


def make_archive(root: Path, count: int) -> list[str]:
    """``count`` small smooth photos, encoded (amortized) as ``bitstreams/<key>.sga``."""
    import numpy as np

    from codec.api import Codec
    from codec.images import load_image
    from codec.inference import InferenceConfig

    codec = Codec(device="cpu")
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    keys = []
    for i in range(count):
        rgb = np.stack([(xx * (1 + i % 3) + yy) % 256, (yy * 2 + i * 7) % 256,
                        (xx + yy * (1 + i % 2) + 40 * i) % 256], axis=-1).astype(np.uint8)
        from PIL import Image

        src = root / "src" / f"img{i:02d}.png"
        src.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(src)
        stream = codec.encode(load_image(src), InferenceConfig(method="amortized")).data
        key = f"photos/img {i:02d}.png"
        target = root / "archive" / "bitstreams" / (key + ".sga")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(stream)
        keys.append(key)
    return keys


def load_module(which: str, before: str):
    """jobs.serve as in the working tree ('now') or as of commit ``before``."""
    if which == "now":
        import jobs.serve

        return jobs.serve
    source = subprocess.run(["git", "show", f"{before}:jobs/serve.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="serve-before-")) / "serve_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("serve_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_before"] = module
    spec.loader.exec_module(module)
    return module


def run_server(which: str, before: str, archive: str, cache_mb: float) -> None:
    """The server process: print the port, serve until terminated."""
    module = load_module(which, before)
    service = module.DecodeService(archive, cache_bytes=int(cache_mb * (1 << 20)))
    server = module.make_server(service, "127.0.0.1", 0, quiet=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def start_server(which: str, before: str, archive: Path, cache_mb: float):
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", which, "--before", before, "--archive",
         str(archive), "--cache-mb", str(cache_mb)], cwd=ROOT, stdout=subprocess.PIPE,
        text=True)
    port = int(proc.stdout.readline())
    return proc, port


def load(port: int, paths: list[str], clients: int, seconds: float) -> float:
    """Requests per second answered 200 by ``clients`` keep-alive clients over ``seconds``."""
    counts = [0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        path = paths[i % len(paths)]
        start.wait()
        while not stop.is_set():
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                counts[i] += 1
            else:
                errors.append(f"{resp.status} for {path}")
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"errors under load: {errors[:3]} ({len(errors)} in all)")
    return sum(counts) / elapsed


def measure(clients: int = 16, seconds: float = 3.0, rounds: int = 2, before: str = BEFORE,
            only: tuple[str, ...] = ("cached", "uncached")) -> dict[str, dict[str, float]]:
    """{case: {"before": req/s, "now": req/s}}, best of ``rounds`` alternating rounds."""
    from urllib.parse import quote

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        keys = make_archive(Path(tmp), clients)
        archive = Path(tmp) / "archive"
        cases = {c: v for c, v in {"cached": (256.0, [keys[0]]), "uncached": (0.0, keys)}.items()
                 if c in only}
        best: dict[str, dict[str, float]] = {c: {"before": 0.0, "now": 0.0} for c in cases}
        for _ in range(rounds):
            for case, (cache_mb, case_keys) in cases.items():
                paths = ["/images/" + quote(k) for k in case_keys]
                for which in ("before", "now"):
                    proc, port = start_server(which, before, archive, cache_mb)
                    try:
                        load(port, paths, clients, 0.5)  # warm-up: model load, cache fill
                        rate = load(port, paths, clients, seconds)
                    finally:
                        proc.terminate()
                        proc.wait(30)
                    best[case][which] = max(best[case][which], rate)
                    print(f"[bench] {case} {which}: {rate:.1f} req/s", file=sys.stderr,
                          flush=True)
        return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default="cached,uncached", help="cached, uncached or both")
    p.add_argument("--before", default=BEFORE, help=f"commit of the earlier server ({BEFORE})")
    p.add_argument("--serve", choices=("before", "now"), help=argparse.SUPPRESS)
    p.add_argument("--archive", help=argparse.SUPPRESS)
    p.add_argument("--cache-mb", type=float, default=256.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return run_server(args.serve, args.before, args.archive, args.cache_mb)
    best = measure(args.clients, args.seconds, args.rounds, args.before,
                   tuple(args.cases.split(",")))
    w, h = SIZE
    print(f"{args.clients} clients, keep-alive, {w}x{h} PNGs, best of {args.rounds} "
          f"rounds of {args.seconds:g} s; before = jobs/serve.py at {args.before}")
    print("| case | before (req/s) | now (req/s) | now / before |\n"
          "| --- | ---: | ---: | ---: |")
    for case, rates in best.items():
        print(f"| {case} | {rates['before']:.1f} | {rates['now']:.1f} | "
              f"{rates['now'] / rates['before']:.2f} |")


if __name__ == "__main__":
    main()
