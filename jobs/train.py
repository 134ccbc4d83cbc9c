"""`sgarc train`: train a Mean-Scale Hyperprior and, optionally, export it into the registry.

The loss, the loop and the checkpoint format are codec.train's; this module is the command:
its flags (their help says what each does), the JSONL log beside the checkpoint (records
after the step a run resumes from are dropped, so each step is logged once), the export
into the registry when training has reached ``--steps`` (codec.registry.export_model), and
with ``--address`` training on a Ray cluster (:mod:`pipeline.train_cluster`). README.md
("Training and evaluation") and docs/jobs.md ("Training on a cluster") have examples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from codec.errors import SgarcError
from jobs.options import STORAGE_OPTIONS_HELP


def log_path(checkpoint: Path) -> Path:
    """The JSONL training log beside a checkpoint: runs/q4.ckpt -> runs/q4.log.jsonl."""
    return checkpoint.with_name(f"{checkpoint.stem}.log.jsonl")


def _checkpoint_steps(checkpoint: Path) -> tuple[int, int] | None:
    """(step, steps behind its --init-from weights) of a checkpoint; None if there is none."""
    if not checkpoint.exists():
        return None
    import torch
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return int(state["step"]), int(state.get("init_steps", 0))


def _prepare_log(path: Path, resume_step: int | None) -> None:
    """Start a fresh log, or keep only the records up to the step a run resumes from."""
    if resume_step is None or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= resume_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    path.write_text("".join(f"{line}\n" for line in kept))


def _config(args):
    from codec.train import TrainConfig
    return TrainConfig(data=list(args.data), lmbda=args.lmbda, N=args.N, M=args.M,
                       steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                       lr=args.lr, lr_drop_at=args.lr_drop_at, lr_cooldown=args.lr_cooldown,
                       seed=args.seed,
                       log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                       init_from=args.init_from, lmbdas=_lmbdas(args.lmbdas),
                       bf16=args.bf16, channels_last=not args.nchw,
                       time_budget=args.time_budget,
                       revive_dead_channels=args.revive_dead_channels,
                       rate_grid=args.rate_grid,
                       rate_weight_power=args.rate_weight_power,
                       hyper_synthesis_of=args.hyper_synthesis_of,
                       fine_tune=args.fine_tune)


def _lmbdas(text: str | None) -> tuple[float, ...]:
    """--lmbdas: 'default' (codec.variable_rate's ladder) or comma-separated values."""
    if not text:
        return ()
    from codec.variable_rate import DEFAULT_LMBDAS, check_lmbdas
    if text == "default":
        return DEFAULT_LMBDAS
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SgarcError(f"--lmbdas {text!r}: expected 'default' or numbers such as "
                         "0.0018,0.0035,0.0067") from None
    try:
        check_lmbdas(values)
    except ValueError:
        raise SgarcError(f"--lmbdas {text!r}: give at least two increasing values") from None
    return values


def _is_url(text: str) -> bool:
    return "://" in text


def _check_data(args) -> None:
    """--data: folders with images here; with --address also URLs (listed later)."""
    from codec.train import image_files

    cluster_only = [name for name, value in (("--workers", args.workers),
                    ("--sample", args.sample), ("--window", args.window),
                    ("--storage-options", args.storage_options)) if value is not None]
    if args.address is None and cluster_only:
        raise SgarcError(f"{', '.join(cluster_only)}: for training on a Ray cluster; add "
                         "--address (local: an in-process Ray here)")
    for folder in args.data:
        if _is_url(folder):
            if args.address is None:
                raise SgarcError(f"--data {folder}: a URL is read on a Ray cluster; add "
                                 "--address (local: an in-process Ray here)")
        elif not Path(folder).is_dir():
            raise SgarcError(f"--data {folder}: not a folder")
    if args.address is None and not image_files(args.data):
        raise SgarcError(f"no images under {', '.join(args.data)}")


def _train_on_cluster(args, cfg, checkpoint: Path, log, on_record):
    from jobs.options import parse_storage_options
    from pipeline.train_cluster import DEFAULT_SAMPLE, DEFAULT_WINDOW, ClusterOptions, train_cluster

    if args.window and args.window < args.crop:
        raise SgarcError(f"--window {args.window} is smaller than --crop {args.crop}")
    options = ClusterOptions(
        address=args.address, workers=args.workers,
        sample=DEFAULT_SAMPLE if args.sample is None else args.sample,
        window=DEFAULT_WINDOW if args.window is None else args.window,
        storage_options=parse_storage_options(args.storage_options),
        timeout=args.timeout)
    return train_cluster(cfg, checkpoint, options, log=log, on_record=on_record)


def cmd_train(args) -> int:
    from tqdm import tqdm

    from codec.model import DOWNSAMPLE
    from codec.registry import REGISTRY, export_model
    from codec.train import train
    from pipeline.storage import StorageError

    if args.crop < DOWNSAMPLE or args.crop % DOWNSAMPLE:
        raise SgarcError(f"--crop must be a multiple of {DOWNSAMPLE} (the model's total "
                         f"downsampling), not {args.crop}")
    if args.bits_back:
        return _train_bits_back(args)
    variable = bool(args.lmbdas)
    if not variable and (args.export is None) != (args.quality is None):
        raise SgarcError("--export ID and --quality Q go together")
    if variable and args.quality is not None:
        raise SgarcError("a variable-rate model (--lmbdas) covers every quality level: "
                         "leave out --quality")
    _check_data(args)
    if any(Path(folder).name == "val" for folder in args.data):
        print("sgarc train: warning: training on a 'val' folder; sgarc eval measures on "
              "those", file=sys.stderr)
    cfg = _config(args)
    checkpoint = Path(args.checkpoint)
    log_file = log_path(checkpoint)
    start = (_checkpoint_steps(checkpoint) or (None, 0))[0]
    _prepare_log(log_file, start)

    bar = tqdm(total=cfg.steps, initial=min(start or 0, cfg.steps), desc="train", unit="step",
               dynamic_ncols=True, disable=args.quiet, file=sys.stderr)

    def log(line: str) -> None:
        if args.quiet:
            print(line, file=sys.stderr)
        else:
            bar.write(line, file=sys.stderr)

    def on_record(record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        with log_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update(record["step"] - bar.n)
        bar.set_postfix(loss=f"{record['loss']:.4f}", bpp=f"{record['bpp']:.3f}",
                        psnr=f"{record['psnr']:.2f}")

    try:
        if args.address is None:
            model = train(cfg, checkpoint, log=log, on_record=on_record)
        else:
            model = _train_on_cluster(args, cfg, checkpoint, log, on_record)
    except SgarcError:
        raise
    except (ValueError, StorageError) as exc:  # mismatched checkpoint, no image large
        raise SgarcError(str(exc)) from None    # enough for the crop, unreadable --data
    finally:
        bar.close()
    steps, init_steps = _checkpoint_steps(checkpoint) or (0, 0)  # --steps 0: none written
    print(f"checkpoint {checkpoint} at step {steps}; log {log_file}")
    if args.export is not None:
        registry = Path(args.registry) if args.registry else REGISTRY
        data = args.export_data or " + ".join(_data_name(d) for d in args.data)
        # The registry counts every step behind the weights, the --init-from model's too.
        entry = export_model(model, args.export, args.quality or 0, cfg.lmbda,
                             init_steps + steps, f"{data}, {cfg.crop}px crops", note=args.note,
                             registry=registry, half=True, default=args.default)
        print(f"exported {entry.id} (quality {entry.quality}, λ {entry.lmbda}, N {entry.N}, "
              f"M {entry.M}, {entry.steps} steps) to {registry.parent / entry.file}, "
              f"sha256 {entry.sha256[:12]}…")
    return 0


def _train_bits_back(args) -> int:
    """`--bits-back`: fine-tune a bits-back model's hyper parts from a shipped model
    (codec.bits_back.finetune; g_a, g_s kept), save its weights at --checkpoint, export."""
    import torch

    from codec import bits_back
    from codec.registry import DEFAULT_QUALITY, REGISTRY, load_point
    from codec.weight_store import check_encodable

    if args.lmbdas or args.address or any(_is_url(d) for d in args.data):
        raise SgarcError("--bits-back trains from local folders, one λ: leave out --lmbdas "
                         "and --address")
    # the named model (a variable-rate one at its default point), else the default model's
    # default level; a decode-only model has no encoder to start from
    src = load_point(args.init_from or DEFAULT_QUALITY)
    check_encodable(src.entry)
    model = bits_back.from_msh(src.model)
    bits_back.finetune(model, args.data, args.steps, args.batch_size, args.crop, args.lr,
                       args.seed, args.log_every,
                       log=lambda record: print(json.dumps(record), file=sys.stderr))
    torch.save(model.state_dict(), args.checkpoint)
    print(f"weights {args.checkpoint} after {args.steps} steps from {src.entry.id}")
    if args.export is not None:
        registry = Path(args.registry) if args.registry else REGISTRY
        data = args.export_data or " + ".join(_data_name(d) for d in args.data)
        entry = bits_back.export(
            model, args.export, src.entry.lmbda, src.entry.steps + args.steps,
            f"{data}, {args.crop}px crops", note=args.note or (
                f"bits-back (experimental), hyper parts fine-tuned from {src.entry.id} for "
                f"{args.steps} steps, g_a/g_s as in {src.entry.id}"), registry=registry)
        print(f"exported {entry.id} (bits-back, λ {entry.lmbda}) to "
              f"{registry.parent / entry.file}, sha256 {entry.sha256[:12]}…")
    return 0


def _data_name(folder: str) -> str:
    """bsds500/train for ../shared/data/bsds500/train: the set and split, not the machine
    (a URL as it is)."""
    if _is_url(folder):
        return folder
    parts = Path(folder).resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else folder


def register(subparsers) -> argparse.ArgumentParser:
    """Add `sgarc train` to the CLI's subparsers."""
    from codec.train import LR_COOLDOWNS, TrainConfig
    from codec.variable_rate import FINE_TUNE_PARTS

    d = TrainConfig(data=[])
    p = subparsers.add_parser(
        "train", help="train a model (resumable) and optionally export it into the registry",
        description="Train a Mean-Scale Hyperprior on random crops (with flips) of the images "
        "in the --data folders, minimizing R + λ·255²·MSE. Train only on the shared data's "
        "train folders (../shared/data/*/train); the val folders are for sgarc eval. "
        "Rerunning with the same --checkpoint resumes. Uses CUDA when present. With --address, "
        "data-parallel on a Ray cluster's workers, --data may be s3:// or other fsspec URLs.")
    p.add_argument("--data", action="append", required=True, metavar="DIR|URL",
                   help="image folder (repeatable), searched recursively; with --address "
                        "also an fsspec URL such as s3://bucket/prefix")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file; resumed from when it exists. The JSONL log goes "
                        "beside it (<stem>.log.jsonl)")
    p.add_argument("--lmbda", type=float, default=d.lmbda,
                   help=f"rate-distortion trade-off λ (default {d.lmbda})")
    p.add_argument("--lmbdas", default=None, metavar="L1,L2,...|default",
                   help="train one variable-rate model (gain units, codec.variable_rate) over "
                        "these λ points, one drawn per crop; 'default' is 0.0009·2^k, k=0..8. "
                        "--lmbda then only gives the λ of a fixed-rate --init-from model when "
                        "its own is unknown")
    p.add_argument("--N", type=int, default=d.N, help=f"channels of z and the transforms "
                   f"(default {d.N})")
    p.add_argument("--M", type=int, default=d.M, help=f"channels of y (default {d.M})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"total steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"crops per step (default {d.batch_size})")
    p.add_argument("--crop", type=int, default=d.crop,
                   help=f"crop size in pixels, a multiple of 64 (default {d.crop}); smaller "
                        "images are skipped")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--lr-drop-at", type=float, default=d.lr_drop_at,
                   help=f"fraction of --steps (or of --time-budget) where the learning rate's "
                        f"cooldown starts (default {d.lr_drop_at})")
    p.add_argument("--lr-cooldown", choices=LR_COOLDOWNS, default=d.lr_cooldown,
                   help="the cooldown's shape: step = lr/10 from --lr-drop-at on; linear, sqrt "
                        f"= down to 0 at the end as 1-t or 1-sqrt(t) (default {d.lr_cooldown})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"steps per log record (default {d.log_every})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default {d.checkpoint_every})")
    p.add_argument("--init-from", default=None, metavar="ID|PATH",
                   help="start a new run from a registered model's weights or a checkpoint "
                        "(fine-tuning a neighbouring quality); ignored when resuming")
    p.add_argument("--revive-dead-channels", action="store_true",
                   help="once, at the start: split latent channels that carry no bits at the "
                        "top λ from live ones (variable-rate models; docs/codec.md)")
    p.add_argument("--rate-grid", action="store_true",
                   help="variable-rate: draw each crop's rate from every grid point, not "
                        "only the trained λ, so the points in between are trained too")
    p.add_argument("--rate-weight-power", type=float, default=d.rate_weight_power,
                   metavar="P",
                   help="variable-rate: weight each crop's loss by (λ_r/λ_0)^-P (mean 1 over "
                        "the grid), so the low rates are not drowned by the high ones' larger "
                        f"losses (default {d.rate_weight_power:g}: plain sum)")
    p.add_argument("--hyper-synthesis-of", default=None, metavar="ID",
                   help="use shipped model ID's h_s, fixed (never trained): the export then "
                        "shares those weights with ID's file, two thirds of a model, so it "
                        "fits the 40 MB of shipped weights (docs/codec.md)")
    p.add_argument("--fine-tune", choices=FINE_TUNE_PARTS, default=None,
                   help="train one side only, on the latents as coding rounds them (a fine-tune "
                        "of a noise-trained variable-rate model, --init-from ID): synthesis = "
                        "g_s and the inverse gains; analysis = g_a, h_a and the hyper gains "
                        "(straight-through rounding into the decoder, the noisy rate). The "
                        "export shares the rest with ID (docs/codec.md)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast of the hidden layers, float32 heads (variable-rate "
                        "models; about 1.5x faster per step on CPUs with AVX512-BF16 and on "
                        "GPUs: bench/train_step.py)")
    p.add_argument("--bits-back", action="store_true",
                   help="experimental: a lossy bits-back model (codec.bits_back) from "
                   "--init-from (default: the default model at quality 4): its hyper parts "
                   "fine-tuned, g_a/g_s kept; --checkpoint receives the weights")
    p.add_argument("--nchw", action="store_true",
                   help="plain NCHW layout instead of channels_last (slower; for comparison)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop with a checkpoint after this many seconds (rerun to go on)")
    p.add_argument("--export", default=None, metavar="ID",
                   help="when done, export the model under this id into the registry (fp16)")
    p.add_argument("--default", action="store_true",
                   help="mark the exported model as the default (used when none is named)")
    p.add_argument("--quality", "-q", type=int, default=None,
                   help="quality level of the exported model (with --export); replaces an "
                        "entry with the same level")
    p.add_argument("--registry", default=None, metavar="JSON",
                   help="registry to export into (default: the shipped codec/weights/"
                        "registry.json)")
    p.add_argument("--export-data", default=None, metavar="TEXT",
                   help="the registry's description of the training data (default: the "
                        "--data folders' set/split names)")
    p.add_argument("--note", default="", help="note stored in the registry entry")
    p.add_argument("--quiet", action="store_true", help="log lines only, no progress bar")
    c = p.add_argument_group(
        "training on a Ray cluster",
        "data-parallel training through Ray Train (DDP; GPUs when the cluster has them). The "
        "checkpoint and log are written here, in the same format as without --address")
    c.add_argument("--address", default=None, metavar="local|auto|ray://HOST:10001",
                   help="train on Ray workers: 'local' starts an in-process Ray here, 'auto' "
                        "joins the cluster this machine belongs to, ray:// a remote one")
    c.add_argument("--workers", type=int, default=None, metavar="W",
                   help="data-parallel workers, each taking --batch-size crops per step "
                        "(default: one per GPU, or one per node on a CPU cluster)")
    c.add_argument("--sample", type=int, default=None, metavar="N",
                   help="train on N images drawn (by --seed, deterministically) from those "
                        "listed under --data (default 2000); each worker reads its share once")
    c.add_argument("--window", type=int, default=None, metavar="PIXELS",
                   help="keep one random window of at most PIXELS a side of each sampled "
                        "image, which bounds memory to about N x PIXELS² x 3 bytes over the "
                        "cluster (default 1024; 0: whole images)")
    c.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=STORAGE_OPTIONS_HELP + ", for --data URLs")
    c.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help=argparse.SUPPRESS)  # tests: give up waiting on the cluster
    p.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.train ARGS`` is ``sgarc train ARGS``."""
    from jobs.cli import run_as
    return run_as("train", argv)


if __name__ == "__main__":
    sys.exit(main())
