"""Encode images to sgarc bitstreams and decode them back: the codec's public surface.

    codec = Codec(quality=3)                      # loads a shipped model once
    result = codec.encode(load_image("a.jpg"))    # InferenceConfig(): SGA, product defaults
    decoded = decode(result.data)                 # any device, any thread count
    decoded.save("a.png")                         # with its EXIF / ICC / XMP where PNG allows

Encoding = inference (codec.inference) -> exact integer hyper-synthesis for the coding
parameters (codec.frozen) -> entropy coding (codec.coding) -> bitstream (codec.bitstream)
-> verification: the stream is parsed and its latents (and metadata) decoded exactly as a
decoder would, and must equal what was encoded, before a result is returned. The source's
metadata (codec.metadata) rides along in the META section.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from codec import coding, tiling, weight_store
from codec.bitstream import (
    Bitstream,
    Header,
    latent_grids,
    pack,
    pack_alpha,
    parse,
    unpack_alpha,
)
from codec.errors import BitstreamError, ImageError, ModelError
from codec.frozen import LATENT_LIMIT, hyper_synthesis_exact
from codec.images import (
    DEFAULT_MAX_PIXELS,
    PreparedImage,
    output_format,
    output_pixels,
    padded_batch,
    save_image,
)
from codec.inference import RATE_CHANNELS, InferenceConfig, infer
from codec.metadata import Metadata, RestoreReport, save_params, unpack
from codec.metrics import bpp, psnr, psnr_from_mse
from codec.model import DOWNSAMPLE
from codec.registry import REGISTRY, LoadedModel, load, load_point

if TYPE_CHECKING:
    from codec.targets import Target

_WORD = np.dtype(">u4")  # streams are stored as big-endian 32-bit words


@dataclass
class EncodeResult:
    data: bytes
    width: int
    height: int
    model_id: str
    lmbda: float
    method: str
    iterations: int
    bits: int  # whole file, header included: what `bpp` is computed from
    payload_bits: int  # the two latent streams only
    estimated_bits: float  # -log2 P(z_hat) - log2 P(y_hat | z_hat) under the model
    bpp: float
    psnr: float  # of the decoded 8-bit pixels against the source pixels
    rd_loss: float  # true RD loss of the chosen latents (model rate, float synthesis)
    amortized_bpp: float  # estimated bpp / PSNR / RD loss of the amortized start
    amortized_psnr: float
    amortized_rd_loss: float
    seconds: float
    device: str
    metadata_bytes: int = 0  # META payload (EXIF, ICC, XMP, provenance); part of `bits`
    rate: int | None = None  # rate point of a variable-rate model (grid index)
    target: str | None = None  # "psnr" or "bpp" when coded to a target (codec.targets)
    target_value: float | None = None
    target_met: bool | None = None
    layout: str = "tight"  # the latents' layout (header pad_mode: codec.bitstream.PAD_MODES)

    @property
    def estimate_overhead(self) -> float:
        """Relative excess of the coded payload over the model's estimate."""
        return self.payload_bits / self.estimated_bits - 1.0

    def summary(self) -> str:
        rate = f", rate point {self.rate}" if self.rate is not None else ""
        target = ""
        if self.target is not None:
            goal = (f"PSNR ≥ {self.target_value:g} dB" if self.target == "psnr"
                    else f"≤ {self.target_value:g} bpp")
            target = f"; target {goal} {'met' if self.target_met else 'MISSED'}"
        return (f"{self.width}x{self.height} {self.bpp:.4f} bpp, PSNR {self.psnr:.2f} dB, "
                f"bits est {self.estimated_bits:.0f} / actual {self.payload_bits} "
                f"({100 * self.estimate_overhead:+.2f}%), file {self.bits // 8} B, "
                f"{self.seconds:.2f} s [{self.method}, {self.iterations} it, {self.device}"
                f"{rate}]{target}")


@dataclass
class DecodedImage:
    rgb: np.ndarray  # uint8 (H, W, 3)
    alpha: np.ndarray | None  # uint8 (H, W)
    header: Header
    metadata: Metadata | None = None  # None: the stream has none, or it was not read
    source: bytes | None = None  # the source file itself (jpeg-lossless / original routes)
    source_format: str | None = None  # its Pillow format

    def to_pil(self):
        from codec.images import to_pil
        return to_pil(self.rgb, self.header.color, self.alpha)

    def save(self, path: str | os.PathLike[str], format: str | None = None, *,
             strip_metadata: bool = False, **params: Any) -> RestoreReport:
        """Write the image atomically with its metadata where the format can carry it.

        What went back and what was skipped (and why) is in the report; metadata never makes
        a save fail: if Pillow refuses it, the pixels are written without it. A stream that
        holds the source file writes that file, byte for byte, when asked for its format.
        """
        fmt = output_format(path, format)
        if not strip_metadata and not params and self.original_for(fmt):
            from codec.files import atomic_write
            atomic_write(path, self.source)
            return RestoreReport(restored=list(self.metadata.kept) if self.metadata else [])
        img = self.to_pil()
        if strip_metadata:
            extra, report = {}, RestoreReport(stripped=True)
        else:
            extra, report = save_params(self.metadata, fmt, img.mode, self.header.orientation)
        try:
            save_image(img, path, fmt, **{**extra, **params})
        except ImageError as exc:
            if not extra:
                raise
            save_image(img, path, fmt, **params)
            report = RestoreReport(skipped=[(name, f"refused by the {fmt} writer ({exc})")
                                            for name in report.restored] + report.skipped)
        return report

    def original_for(self, fmt: str) -> bool:
        """Whether the source file itself is the answer to a request for Pillow format fmt."""
        from codec.routes import same_format
        return self.source is not None and same_format(self.source_format, fmt)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def latent_shapes(lm: LoadedModel, width: int, height: int, pad_mode: str
                  ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes (C, rows, columns) of z_hat and of the k a stream codes
    (codec.bitstream.latent_grids; y's whole grid is 4x z's, with k = 0 beyond)."""
    z, y = latent_grids(width, height, pad_mode)
    return (lm.entry.N, *z), (lm.entry.M, *y)


def _words(bs: Bitstream, tag: str, num_symbols: int) -> np.ndarray:
    payload = bs.sections[tag]
    if len(payload) % 4 or len(payload) // 4 > coding.max_stream_words(num_symbols):
        raise BitstreamError(f"section {tag} has an invalid length {len(payload)} for "
                             f"{num_symbols} symbols")
    return np.frombuffer(payload, _WORD).astype(np.uint32)


def decode_latents(bs: Bitstream, lm: LoadedModel
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z_hat, k, mu) of a parsed stream, exactly as every decoder computes them."""
    h = bs.header
    z_shape, y_shape = latent_shapes(lm, h.width, h.height, h.pad_mode)
    z_hat = coding.decode_z(lm.tables, _words(bs, "ZLAT", int(np.prod(z_shape))), z_shape)
    mu, index = hyper_synthesis_exact(lm.tables, z_hat[None])
    full = (lm.entry.M, *latent_grids(h.width, h.height, "replicate")[1])
    if mu.shape[1:] != full:
        raise BitstreamError(f"model {lm.entry.id} gives y of shape {mu.shape[1:]}, "
                             f"expected {full}")
    rows, cols = y_shape[1:]
    coded = np.ascontiguousarray(index[0, :, :rows, :cols])
    del index
    k = np.zeros(full, np.int32)  # k = 0 (y_hat = mu) outside the coded grid
    k[:, :rows, :cols] = coding.decode_y(lm.tables, _words(bs, "YLAT", int(np.prod(y_shape))),
                                         coded)
    return z_hat, k, mu[0]


def y_hat_of(mu: np.ndarray, k: np.ndarray) -> torch.Tensor:
    """y_hat = mu + k as float32 (M, H, W): the exact float64 sum rounded once, channel by
    channel, so no full-size float64 y_hat is made beside mu and k."""
    y = torch.empty(mu.shape, dtype=torch.float32)
    out = y.numpy()
    for c in range(mu.shape[0]):
        np.add(mu[c], k[c], out=out[c], casting="same_kind")
    return y


def _synthesize(lm: LoadedModel, y_hat: torch.Tensor, height: int, width: int,
                device: torch.device) -> np.ndarray:
    """8-bit pixels (height, width, 3) of g_s(y_hat) for float32 y_hat (M, H, W); large
    images over tiles (codec.tiling), so memory stays bounded and no full-size float image
    is made."""
    return tiling.synthesize_pixels(lm.on(device).g_s, y_hat.to(device)[None], height, width)[0]


def _load_for(header: Header, registry) -> LoadedModel:
    """The model (at the stream's rate point, for a variable-rate model) a stream needs."""
    try:
        lm = load(header.model_id, registry)
    except ModelError as exc:
        raise BitstreamError(f"stream was written with model {header.model_id!r}, which is "
                             f"not available: {exc}") from exc
    if (header.rate is None) != (lm.variable is None):
        raise BitstreamError(f"model {header.model_id!r} is "
                             f"{'variable' if lm.variable is not None else 'fixed'}-rate but "
                             f"the stream {'has no' if header.rate is None else 'has a'} "
                             "rate point")
    if header.rate is None:
        return lm
    try:
        return lm.at(header.rate)
    except ModelError as exc:
        raise BitstreamError(f"invalid rate point: {exc}") from exc


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, device: str | None = "cpu",
           registry=REGISTRY, read_metadata: bool = True) -> DecodedImage:
    """Decode a stream to 8-bit pixels; corrupt input raises BitstreamError.

    ``read_metadata=False`` leaves the META section unread (and unvalidated), so the pixels
    of a stream whose metadata is corrupt can still be had.
    """
    bs = parse(data, max_pixels)
    h = bs.header
    meta = unpack(bs.sections["META"]) if read_metadata and "META" in bs.sections else None
    if h.route != "learned":  # the source file itself (codec.routes)
        from codec.routes import decode_source
        return decode_source(bs, meta, max_pixels, read_metadata)
    if h.bbvi_steps is not None:  # a bits-back stream: the image, no BBVI (codec.bits_back)
        from codec import bits_back
        rgb, alpha, _ = bits_back.decode(bs, registry=registry, device=device or "cpu")
        return DecodedImage(rgb, alpha, h, meta)
    lm = _load_for(h, registry)
    _, k, mu = decode_latents(bs, lm)
    y_hat = y_hat_of(mu, k)
    del k, mu  # from here on only y_hat, one tile and the 8-bit output (docs/benchmarks.md)
    rgb = _synthesize(lm, y_hat, h.height, h.width, torch.device(device or "cpu"))
    alpha = None
    if "ALPH" in bs.sections:
        alpha = np.frombuffer(unpack_alpha(bs.sections["ALPH"], h.width, h.height),
                              np.uint8).reshape(h.height, h.width)
    return DecodedImage(rgb, alpha, h, meta)


class Codec:
    """One loaded model on one device (at one rate point, for a variable-rate model);
    encodes single images or same-size batches.

    `model` is an id, a quality level (1..6: a fixed-rate model of that level, else the
    rate point it names on the default variable-rate model) or None (the default); `rate`
    is a grid index of a variable-rate model (codec.variable_rate).
    """

    def __init__(self, model: str | int | None = None, device: str | torch.device | None = None,
                 registry=REGISTRY, rate: int | None = None) -> None:
        self.lm = load_point(model, rate, registry)
        weight_store.check_encodable(self.lm.entry)
        self.registry = registry
        self.device = torch.device(device) if device is not None else default_device()
        self.model = self.lm.on(self.device)

    @property
    def model_id(self) -> str:
        return self.lm.entry.id

    @property
    def rate(self) -> int | None:
        """The rate point (grid index) streams are coded at; None for a fixed-rate model."""
        return self.lm.rate

    def at_rate(self, rate: int) -> Codec:
        """This codec at another rate point of its variable-rate model (shares the model)."""
        other = object.__new__(Codec)
        other.lm = self.lm.at(self.lm.encodable(rate))
        other.registry, other.device = self.registry, self.device
        other.model = other.lm.on(self.device)
        return other

    def encode(self, image: PreparedImage, config: InferenceConfig | None = None,
               progress: Callable[[int], None] | None = None) -> EncodeResult:
        return self.encode_batch([image], config, progress)[0]

    def encode_to_target(self, image: PreparedImage, target: Target,
                         config: InferenceConfig | None = None,
                         progress: Callable[[int], None] | None = None) -> EncodeResult:
        """Encode at the rate point that meets a PSNR or bpp target (codec.targets)."""
        from codec.targets import encode_to_target
        return encode_to_target(self, image, target, config or InferenceConfig(), progress)

    def encode_batch(self, images: list[PreparedImage], config: InferenceConfig | None = None,
                     progress: Callable[[int], None] | None = None,
                     max_batch: int = 8) -> list[EncodeResult]:
        """Encode images; those of one padded size run inference together."""
        config = config or InferenceConfig()
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[padded_size(im)].append(i)
        results: list[EncodeResult | None] = [None] * len(images)
        for members in groups.values():
            for start in range(0, len(members), max_batch):
                chunk = members[start:start + max_batch]
                for i, r in zip(chunk, self._encode_same_size([images[i] for i in chunk],
                                                              config, progress), strict=True):
                    results[i] = r
        return results  # type: ignore[return-value]

    def encode_snapshots(self, image: PreparedImage, config: InferenceConfig,
                         progress: Callable[[int], None] | None = None
                         ) -> dict[int, EncodeResult]:
        """One iterative run, coded as it stood at each of `config.snapshots` iterations.

        Under the paper's schedule, which does not depend on the budget, the stream at t is
        the one a separate t-iteration run gives, for the price of the longest run only
        (sgarc eval's 100 / 500 / 2000 iterations). Seconds are prorated by iterations.
        Refused for the scaled schedule and early stopping, where a snapshot is not what a
        shorter run would give.
        """
        if config.schedule != "paper" or config.patience:
            raise ValueError("encode_snapshots needs schedule='paper' and patience=0: "
                             "otherwise a snapshot is not a shorter run")
        lat, elapsed = self._infer([image], config, progress)
        ran = max(lat.iterations[0], 1)
        out = {}
        for t, (k, z_hat, loss) in sorted(lat.snapshots.items()):
            at_t = replace(lat, k=k, z_hat=z_hat, loss=loss,
                           iterations=[min(t, lat.iterations[0])])
            out[t] = self._code_one(image, at_t, 0, config, elapsed * min(t, ran) / ran)
        return out

    def _infer(self, images: list[PreparedImage], config: InferenceConfig, progress):
        """Latents of images of one padded size, and the inference seconds per image."""
        t0 = time.perf_counter()
        # 8-bit, converted to float tile by tile (codec.tiling.to_unit): never a float image;
        # on the CPU not even padded whole (each tile pads its window: tiling.Padded)
        x = tiling.Padded([im.rgb for im in images], DOWNSAMPLE, self.device)
        if self.device.type != "cpu":  # in the device's memory, once: no copy per tile
            x = torch.from_numpy(padded_batch([im.rgb for im in images], DOWNSAMPLE))
            x = x.permute(0, 3, 1, 2).to(self.device)
        sizes = [(im.info.height, im.info.width) for im in images]
        lat = infer(self.model, x, sizes, self.lm.entry.lmbda, config, progress)
        return lat, (time.perf_counter() - t0) / len(images)

    def _encode_same_size(self, images: list[PreparedImage], config: InferenceConfig,
                          progress) -> list[EncodeResult]:
        lat, elapsed = self._infer(images, config, progress)
        return [self._code_one(im, lat, i, config, elapsed) for i, im in enumerate(images)]

    def _code_one(self, im: PreparedImage, lat, i: int, config: InferenceConfig,
                  inference_seconds: float) -> EncodeResult:
        t0 = time.perf_counter()
        lm, info = self.lm, im.info
        # the codable values (|v| <= LATENT_LIMIT), in int16 as inference hands them over
        z_hat, k = _codable(lat.z_hat[i]), _codable(lat.k[i])
        layout = lat.layouts[i]
        rows, cols = latent_grids(info.width, info.height, layout)[1]
        coded = np.ascontiguousarray(k[:, :rows, :cols])  # beyond: k = 0, not coded
        _, index = hyper_synthesis_exact(lm.tables, z_hat[None], mean=False, size=(rows, cols))
        sections = {
            "ZLAT": coding.encode_z(lm.tables, z_hat).astype(_WORD).tobytes(),
            "YLAT": coding.encode_y(lm.tables, coded, index[0]).astype(_WORD).tobytes(),
        }
        del index
        if im.alpha is not None:
            sections["ALPH"] = pack_alpha(np.ascontiguousarray(im.alpha).tobytes())
        if im.metadata is not None and im.metadata.fields():
            sections["META"] = im.metadata.pack()
        header = Header(lm.entry.id, info.width, info.height, info.color, info.orientation,
                        info.bit_depth, layout, rate=lm.rate)
        data = pack(Bitstream(header, sections))
        estimated_bits = self._estimated_bits(z_hat, coded)
        del coded
        # the decoder's mu, once the stream is verified: the encoder never holds two
        mu = self._verify(data, z_hat, k, im.metadata if "META" in sections else None)
        y_hat = y_hat_of(mu, k)
        del mu, k  # the synthesis below holds y_hat, one tile and the 8-bit output
        rgb = _synthesize(lm, y_hat, info.height, info.width, self.device)
        del y_hat
        amortized_mse = float(lat.start_terms["mse"][i])
        return EncodeResult(
            data=data, width=info.width, height=info.height, model_id=lm.entry.id,
            lmbda=lm.entry.lmbda, method=config.method,
            iterations=lat.iterations[i],  # fewer than configured if it stopped early
            bits=len(data) * 8, payload_bits=8 * (len(sections["ZLAT"]) + len(sections["YLAT"])),
            estimated_bits=estimated_bits,
            bpp=bpp(len(data), info.width, info.height),
            psnr=psnr(output_pixels(rgb, info.color), output_pixels(im.rgb, info.color)),
            rd_loss=float(lat.loss[i]),
            amortized_bpp=float(lat.start_terms["bpp"][i]),
            amortized_psnr=psnr_from_mse(amortized_mse),
            amortized_rd_loss=float(lat.start_loss[i]),
            seconds=inference_seconds + time.perf_counter() - t0, device=str(self.device),
            metadata_bytes=len(sections.get("META", b"")), rate=lm.rate, layout=layout)

    def _verify(self, data: bytes, z_hat: np.ndarray, k: np.ndarray,
                metadata: Metadata | None) -> np.ndarray:
        """Decode the latents (and metadata) back as a decoder would; they must match exactly.
        Returns the decoder's mu (float64 (M, H, W))."""
        bs = parse(data)
        z_dec, k_dec, mu = decode_latents(bs, self.lm)
        if not (np.array_equal(z_dec, z_hat) and np.array_equal(k_dec, k)):
            raise RuntimeError("internal error: the encoded stream does not decode to the "
                               "encoded latents; nothing was written")
        if metadata is not None and unpack(bs.sections["META"]) != metadata:
            raise RuntimeError("internal error: the encoded metadata does not read back as "
                               "written; nothing was written")
        return mu

    @torch.no_grad()
    def _estimated_bits(self, z_hat: np.ndarray, k: np.ndarray) -> float:
        """-log2 P(z_hat) - log2 P(y_hat | z_hat) under the float model for k on the coded
        grid, summed over groups of channels (no full-size float copies of k and y_hat)."""
        model = self.model
        z = torch.from_numpy(z_hat).float()[None].to(self.device)
        mu, sigma = model.hyper_synthesis(z)
        rows, cols = k.shape[1:]  # the coded grid
        mu, sigma = mu[..., :rows, :cols], sigma[..., :rows, :cols]
        bits = 0.0
        for c in range(0, k.shape[0], RATE_CHANNELS):
            at = (slice(None), slice(c, c + RATE_CHANNELS))
            kt = torch.from_numpy(k[c:c + RATE_CHANNELS]).float()[None].to(self.device)
            y_lik, z_lik = model.likelihoods(mu[at] + kt, z, mu[at], sigma[at])
            bits -= float(torch.log2(y_lik).sum()) + (float(torch.log2(z_lik).sum()) if c == 0
                                                      else 0.0)
        return bits


def _codable(v: torch.Tensor) -> np.ndarray:
    """Latents as the coder codes them: int16 from inference (already clamped to
    |v| <= LATENT_LIMIT) as they are, anything else clamped to that, in int32."""
    if v.dtype != torch.int16:
        v = v.clamp(-LATENT_LIMIT, LATENT_LIMIT).to(torch.int32)
    return v.cpu().numpy()


def padded_size(im: PreparedImage) -> tuple[int, int]:
    """Images with the same padded size can share an inference batch."""
    return (-(-im.info.height // DOWNSAMPLE), -(-im.info.width // DOWNSAMPLE))
