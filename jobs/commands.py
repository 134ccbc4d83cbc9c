"""The codec's and the pipeline's commands: encode, decode, info, models, run, refine.

Their encode flags are generated from pipeline.settings.EncodeSettings
(jobs.options.add_settings_options), so they are the job spec's [encode] keys, with the
same bounds and defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from codec.errors import SgarcError
from codec.files import atomic_write
from jobs.options import (
    STORAGE_OPTIONS_HELP,
    add_settings_options,
    parse_storage_options,
    settings_from_args,
)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="it", leave=False, dynamic_ncols=True,
                disable=total == 0)


def cmd_encode(args: argparse.Namespace) -> int:
    from codec import bits_back, routes
    from codec.api import Codec
    from codec.images import load_image

    if getattr(args, "method", None) in bits_back.METHODS:
        return _encode_bits_back(args)
    settings = settings_from_args(args)  # what a pipeline run with these options would do
    cfg, target = settings.inference(), settings.target()
    source = Path(args.input).read_bytes()
    image = load_image(source, alpha=settings.alpha, depth=settings.depth,
                       name=Path(args.input).name, max_pixels=settings.max_pixels,
                       metadata=settings.metadata)
    codec = Codec(settings.model_ref, device=args.device, rate=settings.rate)
    total = 0 if cfg.method == "amortized" else cfg.iterations
    with _progress_bar(total, f"{cfg.method} {Path(args.input).name}") as bar:
        routed = routes.encode(codec, image, source, settings.policy(), cfg, target,
                               progress=bar.update)
    atomic_write(Path(args.output), routed.data)
    print(f"{args.input} -> {args.output}: {routed.summary()}")
    result = routed.learned
    if routed.route != "learned":
        why = ("the learned stream would be larger" if routed.learned is None
               or settings.policy().allows(result.psnr) else
               f"the learned stream ({result.psnr:.2f} dB) is below the floor")
        print(f"sgarc encode: stored as {routed.route} (the source file, bit-exact): {why}",
              file=sys.stderr)
    elif target is not None and result.target_met is False:
        end = "highest" if target.kind == "psnr" else "lowest"
        print(f"sgarc encode: warning: target {target.describe()} is out of reach of model "
              f"{result.model_id}: coded at its {end} rate point ({result.bpp:.3f} bpp, "
              f"{result.psnr:.2f} dB)", file=sys.stderr)
    meta = image.metadata
    if meta is not None and (meta.kept or meta.dropped):
        kept = ", ".join(f"{f} {len(getattr(meta, f))} B" for f in meta.kept) or "nothing"
        dropped = f"; dropped (over the limit): {', '.join(meta.dropped)}" if meta.dropped else ""
        print(f"metadata kept: {kept} ({result.metadata_bytes} B with provenance){dropped}")
    return 0


def _encode_bits_back(args: argparse.Namespace) -> int:
    """`--method sga-bb | bb-no-sga | bb-amortized` (experimental, codec.bits_back): the
    image carries the bytes of --side-info in its choice of hyper-latents."""
    from codec import bits_back
    from codec.images import load_image

    method, model = args.method, getattr(args, "model", None)
    if getattr(args, "quality", None) is not None or getattr(args, "rate", None) is not None:
        raise SgarcError("the bits-back methods use a bits-back model (--model, default the "
                         "shipped one), not --quality or --rate")
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                  if k not in ("method", "model")})
    settings = settings_from_args(plain)  # the other encode flags, validated as usual
    if settings.target() is not None or settings.min_psnr is not None:
        raise SgarcError("the bits-back methods take no --target-psnr, --target-bpp or "
                         "--min-psnr (experimental: one model, one rate)")
    side_info = Path(args.side_info).read_bytes() if args.side_info else b""
    if not side_info:
        print("sgarc encode: note: no --side-info: random filler takes its place, so the "
              "file is larger than one without bits-back", file=sys.stderr)
    image = load_image(Path(args.input).read_bytes(), alpha=settings.alpha,
                       depth=settings.depth, name=Path(args.input).name,
                       max_pixels=settings.max_pixels, metadata=settings.metadata)
    cfg = settings.inference()
    total = cfg.iterations if method == "sga-bb" else 0
    try:
        with _progress_bar(total, f"{method} {Path(args.input).name}") as bar:
            result = bits_back.encode(image, side_info, model, method, cfg, args.bbvi_steps,
                                      args.device or "cpu", progress=bar.update)
    except ValueError as exc:  # side information too large, bad step count
        raise SgarcError(str(exc)) from None
    atomic_write(Path(args.output), result.data)
    print(f"{args.input} -> {args.output}: {result.summary()}")
    return 0


def _save_side_info(args: argparse.Namespace, data: bytes) -> None:
    """`decode --side-info-out`: BBVI as the encoder ran it, then the bytes, written whole."""
    from codec import bits_back
    from codec.bitstream import parse

    bs = parse(data, args.max_pixels)
    if bs.header.bbvi_steps is None:
        raise SgarcError(f"{args.input} carries no side information (it was not encoded with "
                         "a bits-back method)")
    side_info = bits_back.recover_side_info(bs)  # the image itself is decoded once, after
    atomic_write(Path(args.side_info_out), side_info)
    print(f"side information: {len(side_info)} bytes -> {args.side_info_out}")


def _storage_options(args: argparse.Namespace) -> dict | None:
    return parse_storage_options(getattr(args, "storage_options", None))


def _read_input(args: argparse.Namespace) -> bytes:
    """A local path, or any fsspec URL (s3://..., gs://...) read with retries."""
    from pipeline.decode_service import read_url

    return read_url(args.input, _storage_options(args))


def cmd_decode(args: argparse.Namespace) -> int:
    from codec.api import decode
    from codec.images import output_format

    output = args.output_opt or args.output
    if not output:
        raise SgarcError("no output file: give OUT or -o OUT (e.g. -o photo.png)")
    t0 = time.perf_counter()
    data = _read_input(args)
    if args.side_info_out:
        _save_side_info(args, data)
    decoded = decode(data, max_pixels=args.max_pixels,
                     device=args.device, read_metadata=not args.strip_metadata)
    args.output = output
    report = decoded.save(Path(output), strip_metadata=args.strip_metadata)
    h = decoded.header
    how = f"model {h.model_id}" if h.route == "learned" else f"route {h.route}"
    if decoded.original_for(output_format(output)) and not args.strip_metadata:
        how += ", the original file byte for byte"
    print(f"{args.input} -> {args.output}: {h.width}x{h.height} {h.color}"
          f"{'+alpha' if decoded.alpha is not None else ''}, {how}, "
          f"{time.perf_counter() - t0:.2f} s; {report.summary()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from codec.bitstream import latent_grids, parse
    from codec.metadata import describe, unpack

    data = _read_input(args)
    bs = parse(data)
    h = bs.header
    print(f"file:        {args.input} ({len(data)} bytes, "
          f"{len(data) * 8 / (h.width * h.height):.4f} bpp)")
    print(f"route:       {h.route}" + ("" if h.route == "learned" else
                                          " (the source file, bit-exact; no model)"))
    if h.route == "learned":
        print(f"model:       {h.model_id}" + ("" if h.rate is None else
                                              f", rate point {h.rate}"))
    print(f"size:        {h.width}x{h.height}")
    if h.route == "learned":
        z, y = latent_grids(h.width, h.height, h.pad_mode)
        full = latent_grids(h.width, h.height, "replicate")[1]  # all of y's grid
        print(f"latents:     {h.pad_mode} layout: y coded on {y[0]}x{y[1]} of "
              f"{full[0]}x{full[1]}, z {z[0]}x{z[1]} (docs/bitstream.md)")
    print(f"color:       {h.color}, source bit depth {h.bit_depth}")
    print(f"orientation: source EXIF orientation {h.orientation} (pixels stored upright)")
    for tag, payload in bs.sections.items():
        print(f"section:     {tag} {len(payload)} bytes")
    if "META" in bs.sections:
        meta = unpack(bs.sections["META"])  # a corrupt record: one clear error, exit status 2
        for label, text in describe(meta):
            print(f"{label + ':':<12} {text}")
    elif h.route == "original":
        import hashlib
        print(f"sha256:      {hashlib.sha256(bs.sections['ORIG']).hexdigest()} (the file)")
    else:
        print("metadata:    none")
    if h.route != "learned":
        print("metadata:    EXIF / ICC / XMP as in the stored file")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from codec.registry import entries

    rows = entries()
    if not rows:
        print("no models registered")
        return 1
    print(f"{'quality':>7}  {'id':<24} {'lambda':>8} {'N':>4} {'M':>4} {'steps':>8}  data")
    for e in rows:
        level = ("-" if e.decode_only else "1..6" if e.variable_rate
                 else "bb" if e.bits_back is not None else e.quality)
        print(f"{level:>7}  {e.id:<24} {e.lmbda:>8.4g} {e.N:>4} {e.M:>4} {e.steps:>8}  "
              f"{e.data}{'  [default]' if e.default else ''}")
        if e.decode_only:
            print(f"{'':>9}decode-only: its streams decode; new images encode with "
                  f"{e.decode_only}")
        if e.variable_rate and not e.decode_only:
            from codec.variable_rate import RATE_STEPS
            top = (len(e.lmbdas) - 1) * RATE_STEPS
            rates = f"0..{top}" if e.rate_step == 1 else f"0..{top} in steps of {e.rate_step}"
            print(f"{'':>9}variable rate: --rate {rates} (λ {e.lmbdas[0]:g} .. "
                  f"{e.lmbdas[-1]:g}, {RATE_STEPS} points per doubling of λ); "
                  "--quality 1..6 name points of it; --target-psnr / --target-bpp")
        if e.bits_back is not None:
            print(f"{'':>9}experimental lossy bits-back: --method sga-bb (bb-no-sga, "
                  "bb-amortized) --side-info FILE; decode --side-info-out FILE")
    return 0


def cmd_run(args: argparse.Namespace, mode: str = "encode") -> int:
    from pipeline.run import RunOptions, refine, run

    settings = settings_from_args(args)
    storage_options = _storage_options(args)
    options = RunOptions(shard_size=args.shard_size, actors=args.actors, address=args.address,
                         device=args.device, run_id=args.run_id, manifest=args.manifest,
                         dry_run=args.dry_run)
    if mode == "refine":
        summary = refine(args.input, args.output, settings, options, storage_options,
                         max_images=args.max_images)
    else:
        summary = run(args.input, args.output, settings, options, storage_options)
    print(summary.line())
    if summary.dry_run:
        return 0
    print(f"metrics: {summary.output_url.rstrip('/')}/metrics/run={summary.run_id}/")
    return 0 if summary.errors == 0 else 1


def cmd_refine(args: argparse.Namespace) -> int:
    return cmd_run(args, mode="refine")


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    """INPUT, OUTPUT and the options of a pipeline run (`run` and `refine`)."""
    p.add_argument("input", metavar="INPUT")
    p.add_argument("output", metavar="OUTPUT")
    add_settings_options(p.add_argument_group("encode settings (a job spec's [encode] keys)"))
    p.add_argument("--shard-size", type=int, default=16, help="images per shard (default 16)")
    p.add_argument("--actors", type=int, default=None,
                   help="encoder actors (default: one per GPU, else sized to the CPUs)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: an in-process local Ray)")
    p.add_argument("--device", default=None, help="torch device in actors (default: cuda "
                   "when present)")
    p.add_argument("--manifest", default=None,
                   help="text file listing the keys to encode, one per line (under INPUT)")
    p.add_argument("--run-id", default=None, help="resume (or name) this run")
    p.add_argument("--dry-run", action="store_true",
                   help="plan only: print how many images would be encoded and skipped, in "
                        "how many shards; starts no Ray and writes nothing")
    p.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=STORAGE_OPTIONS_HELP + ", e.g. '{\"client_kwargs\": {\"endpoint_url\": "
                   "\"http://minio:9000\"}}'")


def _add_bits_back_options(p: argparse.ArgumentParser) -> None:
    """The paper's lossy bits-back methods join --method's choices (CLI only)."""
    from codec import bits_back

    for action in p._actions:
        if action.dest == "method" and action.choices is not None:
            action.choices = (*action.choices, *bits_back.METHODS)
            action.help += (f"; experimental lossy bits-back: {', '.join(bits_back.METHODS)} "
                            "(with --side-info)")
    g = p.add_argument_group("lossy bits-back (experimental; docs/codec.md)")
    g.add_argument("--side-info", default=None, metavar="FILE",
                   help="bytes to carry in the stream (at most 1 MiB); `sgarc decode "
                        "--side-info-out` gives them back")
    g.add_argument("--bbvi-steps", type=int, default=bits_back.DEFAULT_BBVI_STEPS,
                   metavar="N", help="steps of the reproducible BBVI that encoder and decoder "
                   f"run (default {bits_back.DEFAULT_BBVI_STEPS}; bb-amortized runs none)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add encode, run, refine, decode, info and models to the sgarc parser."""
    from codec.images import DEFAULT_MAX_PIXELS

    p = subparsers.add_parser("encode", help="encode an image to an .sga bitstream",
                              description="Encode IN (JPEG, PNG, WebP, TIFF, ...) to the "
                              "bitstream OUT.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    add_settings_options(p.add_argument_group("encode settings (a job spec's [encode] keys)"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    _add_bits_back_options(p)
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser(
        "run", help="recompress every image under INPUT into OUTPUT with Ray",
        description="Encode every image under INPUT (a local folder or any fsspec URL: "
        "s3://bucket/prefix, gs://..., memory://...) into OUTPUT: bitstreams at "
        "OUTPUT/bitstreams/<key>.sga, per-image metrics as Parquet under OUTPUT/metrics/. "
        "Images already done with the same settings are skipped; an interrupted run resumes "
        "when started again. Exit status 1 when some images failed (see the error rows).")
    _add_pipeline_options(p)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "refine", help="re-encode with SGA the images whose stored encoding is below target",
        description="A refinement run: re-encode, with the given method and iterations, the "
        "images under INPUT whose stored encoding in OUTPUT (same source bytes and model) is "
        "below that target, highest RD loss first; a bitstream is replaced only when the RD "
        "loss improves. New or changed images are left to `sgarc run`.")
    _add_pipeline_options(p)
    p.add_argument("--max-images", type=int, default=None,
                   help="refine at most this many images in this run")
    p.set_defaults(func=cmd_refine)

    p = subparsers.add_parser("decode", help="decode an .sga bitstream to an image",
                              description="Decode IN (a local path or any fsspec URL, e.g. "
                              "s3://bucket/archive/bitstreams/a.jpg.sga) to OUT; the format "
                              "follows OUT's extension (.png, .jpg, .webp, ...). EXIF, ICC "
                              "profile and XMP go back into JPEG, PNG and WebP files (TIFF: "
                              "the profile), with the EXIF orientation set to 1 since pixels "
                              "are stored upright.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT", nargs="?")
    p.add_argument("-o", "--output", dest="output_opt", metavar="OUT", default=None,
                   help="output file (instead of the positional OUT)")
    p.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=STORAGE_OPTIONS_HELP + ", for a URL input")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse streams that describe larger images")
    p.add_argument("--device", default="cpu", help="torch device for synthesis (default: cpu)")
    p.add_argument("--strip-metadata", action="store_true",
                   help="write the pixels only: no EXIF, ICC profile or XMP (the metadata "
                        "section is not read)")
    p.add_argument("--side-info-out", default=None, metavar="FILE",
                   help="experimental: write the side information a bits-back stream "
                        "carries to FILE (runs the decoder's BBVI; without it none runs)")
    p.set_defaults(func=cmd_decode)

    p = subparsers.add_parser("info", help="show a bitstream's header fields and metadata")
    p.add_argument("input", metavar="FILE", help="a local path or any fsspec URL")
    p.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=STORAGE_OPTIONS_HELP + ", for a URL")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("models", help="list the shipped models")
    p.set_defaults(func=cmd_models)
