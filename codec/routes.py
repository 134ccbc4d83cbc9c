"""Archive routes: per image, the stream that keeps the owner's rules at the fewest bytes.

DESIGN.md decision 9. An archive owner will not replace a photo with something worse than a
quality floor they choose, or bigger than what they had. So each image is stored by one of
three routes, all in the same `.sga` container, the header saying which (docs/bitstream.md):

``learned``
    The learned codec (amortized or SGA). With a variable-rate model and a floor, at the
    lowest rate point that reaches it (codec.targets); with a fixed-rate model, its one
    point. Allowed only when its PSNR (decoded against the source pixels) reaches the floor.
``jpeg-lossless``
    JPEG sources only: the bit-exact JPEG XL transcode of the source file (codec.jpegxl),
    about 20% smaller; decoding gives the original file back byte for byte.
``original``
    The source file as it is, when nothing else is smaller while meeting the floor. Its
    stream is the file plus ``ORIGINAL_OVERHEAD`` (31) bytes of container: no META, so that
    the bound holds for every file.

:func:`choose` takes the smallest stream among the routes that meet the floor (the lossless
routes always do), so a stream is never bigger than its source plus ``MAX_OVERHEAD`` (32)
bytes. Ties go to the simpler route (original, then jpeg-lossless, then learned). Without a
floor the policy is only "never bigger": the learned stream wins whenever it is smaller.

Refinement (:func:`improves`) replaces a stored stream only by one that meets the floor and
is smaller, or when the stored one misses the floor; two learned streams without a floor
compare by RD loss, as before routes existed. So refinement never moves an image below its
floor and never replaces a jpeg-lossless or original stream with a bigger one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from codec import jpegxl
from codec.bitstream import ROUTES, Bitstream, Header, pack, parse  # noqa: F401 (ROUTES)
from codec.errors import BitstreamError, ImageError
from codec.images import PreparedImage
from codec.metadata import Metadata
from codec.metrics import PSNR_CAP, bpp

if TYPE_CHECKING:
    from codec.api import Codec, DecodedImage, EncodeResult
    from codec.inference import InferenceConfig
    from codec.targets import Target

MAX_OVERHEAD = 32  # a stream is at most the source's size plus this
# magic 4, version 1, fixed fields 13, empty model id, route 1, ORIG section header 8, crc 4
ORIGINAL_OVERHEAD = 31
PAYLOAD_TAG = {"jpeg-lossless": "JXLJ", "original": "ORIG"}
_TIE_ORDER = ("original", "jpeg-lossless", "learned")  # equal sizes: the simpler route
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a JPEG with preview frames appended (cameras)


@dataclass(frozen=True)
class Policy:
    """The owner's rules for one job or encode: a PSNR floor (None: none). "Never bigger
    than the source" is always on."""

    min_psnr: float | None = None

    def __post_init__(self) -> None:
        if self.min_psnr is not None and not self.min_psnr > 0:
            raise ValueError(f"min_psnr must be > 0 dB, not {self.min_psnr}")

    def allows(self, psnr: float) -> bool:
        return self.min_psnr is None or psnr >= self.min_psnr


@dataclass
class Routed:
    """The stream chosen for one image, and the learned encoding that was tried."""

    route: str
    data: bytes
    width: int
    height: int
    source_bytes: int
    psnr: float  # of the stream's decoded pixels against the source's; PSNR_CAP when exact
    min_psnr: float | None
    learned: EncodeResult | None  # the learned attempt (its stream is `data` if learned)
    seconds: float = 0.0

    @property
    def bpp(self) -> float:
        return bpp(len(self.data), self.width, self.height)

    @property
    def floor_met(self) -> bool | None:
        """Whether the stream reaches the floor; None without a floor."""
        return None if self.min_psnr is None else self.psnr >= self.min_psnr

    @property
    def saving(self) -> float:
        """1 - stream bytes / source bytes (negative: the stream is larger)."""
        return 1.0 - len(self.data) / self.source_bytes if self.source_bytes else 0.0

    def summary(self) -> str:
        floor = "" if self.min_psnr is None else f", floor {self.min_psnr:g} dB"
        tail = (f"; route {self.route}: {len(self.data)} B, {100 * self.saving:.1f}% smaller "
                f"than the source ({self.source_bytes} B){floor}")
        if self.route == "learned":
            return self.learned.summary() + tail
        tried = ""
        if self.learned is not None:
            tried = (f"; learned would be {len(self.learned.data)} B at "
                     f"{self.learned.psnr:.2f} dB")
        return (f"{self.width}x{self.height} {self.bpp:.4f} bpp, bit-exact, "
                f"{self.seconds:.2f} s" + tail + tried)


def learned_target(policy: Policy, explicit: Target | None, variable_rate: bool
                   ) -> Target | None:
    """The per-image target of the learned attempt: an explicit one (a PSNR target raised to
    the floor), else the floor itself on a variable-rate model; None: its one rate point."""
    from codec.targets import Target

    floor = policy.min_psnr
    if explicit is not None:
        if explicit.kind == "psnr" and floor is not None and floor > explicit.value:
            return Target("psnr", floor)
        return explicit
    if floor is not None and variable_rate:
        return Target("psnr", floor)
    return None


def encode(codec: Codec, image: PreparedImage, source: bytes, policy: Policy,
           config: InferenceConfig | None = None, target: Target | None = None,
           progress: Callable[[int], None] | None = None) -> Routed:
    """Encode one image by the route that meets ``policy`` at the fewest bytes.

    ``source`` is the file ``image`` was loaded from; ``target`` an explicit per-image
    target of the learned attempt (codec.targets)."""
    t0 = time.perf_counter()
    goal = learned_target(policy, target, codec.lm.variable is not None)
    if goal is None:
        learned = codec.encode(image, config, progress)
    else:
        learned = codec.encode_to_target(image, goal, config, progress)
    return choose(image, source, learned, policy, time.perf_counter() - t0)


def choose(image: PreparedImage, source: bytes, learned: EncodeResult | None, policy: Policy,
           seconds: float = 0.0) -> Routed:
    """The smallest of the streams that meet the policy: ``learned`` (when it reaches the
    floor), the JPEG XL transcode (JPEG sources) and the original file."""
    candidates: list[tuple[str, bytes, float]] = []
    if learned is not None and policy.allows(learned.psnr):
        candidates.append(("learned", learned.data, learned.psnr))
    t0 = time.perf_counter()
    jxl = jpeg_lossless_stream(image, source)
    if jxl is not None:
        candidates.append(("jpeg-lossless", jxl, PSNR_CAP))
    candidates.append(("original", original_stream(image, source), PSNR_CAP))
    route, data, psnr = min(candidates, key=lambda c: (len(c[1]), _TIE_ORDER.index(c[0])))
    return Routed(route, data, image.info.width, image.info.height, len(source), psnr,
                  policy.min_psnr, learned, seconds + time.perf_counter() - t0)


# --------------------------------------------------------------------------- the streams


def _header(image: PreparedImage, route: str) -> Header:
    info = image.info
    return Header("", info.width, info.height, info.color, info.orientation, info.bit_depth,
                  route=route)


def is_jpeg(image: PreparedImage, source: bytes) -> bool:
    return image.info.format in _JPEG_FORMATS and source[:2] == b"\xff\xd8"


def jpeg_lossless_stream(image: PreparedImage, source: bytes) -> bytes | None:
    """The jpeg-lossless stream of a JPEG source (None: not a JPEG, or libjxl cannot give it
    back bit-exactly). Its META holds provenance only (format, name, SHA-256): EXIF, ICC and
    XMP are inside the JPEG, which comes back whole."""
    if not is_jpeg(image, source):
        return None
    payload = jpegxl.transcode(source)
    if payload is None:
        return None
    sections = {"JXLJ": payload}
    meta = image.metadata
    provenance = Metadata(meta.source_format if meta else image.info.format,
                          meta.file_name if meta else None,
                          hashlib.sha256(source).digest())
    sections["META"] = provenance.pack()
    return _verified(pack(Bitstream(_header(image, "jpeg-lossless"), sections)), source)


def original_stream(image: PreparedImage, source: bytes) -> bytes:
    """The source file in the container: ``len(source) + ORIGINAL_OVERHEAD`` bytes."""
    data = pack(Bitstream(_header(image, "original"), {"ORIG": bytes(source)}))
    return _verified(data, source)


def _verified(data: bytes, source: bytes) -> bytes:
    """The stream, after checking that it parses and gives back the source exactly."""
    if source_of(parse(data)) != source:
        raise RuntimeError("internal error: the stream does not give back its source; "
                           "nothing was written")
    return data


def source_of(bs: Bitstream) -> bytes:
    """The source file a jpeg-lossless or original stream holds."""
    h = bs.header
    if h.route == "original":
        return bs.sections["ORIG"]
    if h.route == "jpeg-lossless":
        return jpegxl.reconstruct(bs.sections["JXLJ"], h.width, h.height)
    raise ValueError("a learned stream holds latents, not its source file")


def decode_source(bs: Bitstream, meta: Metadata | None, max_pixels: int,
                  read_metadata: bool = True) -> DecodedImage:
    """Pixels (and the file itself) of a jpeg-lossless or original stream.

    The file must match the SHA-256 in META (when read) and the header's size and colour;
    its pixels are what sgarc read from the source at encode, and its metadata is the
    file's own (with the stored file name)."""
    from codec.api import DecodedImage
    from codec.images import load_image

    h = bs.header
    source = source_of(bs)
    if meta is not None and meta.sha256 is not None \
            and hashlib.sha256(source).digest() != meta.sha256:
        raise BitstreamError(f"corrupt {h.route} payload: the file does not match the "
                             "source's SHA-256")
    try:
        image = load_image(source, alpha="keep", depth="reduce" if h.bit_depth == 16 else
                           "error", max_pixels=max_pixels, metadata="drop-oversized")
    except ImageError as exc:
        raise BitstreamError(f"corrupt {h.route} payload: {exc}") from None
    info = image.info
    if (info.width, info.height, info.color) != (h.width, h.height, h.color):
        raise BitstreamError(f"corrupt {h.route} payload: a {info.width}x{info.height} "
                             f"{info.color} image, the header says {h.width}x{h.height} "
                             f"{h.color}")
    metadata = None
    if read_metadata and image.metadata is not None:
        name = meta.file_name if meta is not None else None
        metadata = replace(image.metadata, file_name=name)
    return DecodedImage(image.rgb, image.alpha, h, metadata, source=source,
                        source_format=info.format)


def same_format(source_format: str | None, fmt: str) -> bool:
    """Whether a file of Pillow format ``source_format`` is a ``fmt`` file (MPO is JPEG)."""
    if source_format is None:
        return False
    alias = {"MPO": "JPEG"}
    return alias.get(source_format.upper(), source_format.upper()) == fmt.upper()


# --------------------------------------------------------------------------- refinement


@dataclass(frozen=True)
class Stored:
    """What an archive holds for an image (from its metrics row), for refinement."""

    route: str = "learned"
    bytes: int | None = None
    psnr: float | None = None
    rd_loss: float | None = None


def improves(new: Routed, old: Stored, policy: Policy) -> bool:
    """Whether a refinement's stream should replace the stored one (module docstring)."""
    if not policy.allows(new.psnr):
        return False
    if (policy.min_psnr is None and new.route == old.route == "learned"
            and old.rd_loss is not None and new.learned is not None):
        return new.learned.rd_loss < old.rd_loss
    if old.route == "learned" and old.psnr is not None and not policy.allows(old.psnr):
        return True  # the stored stream misses the floor
    return old.bytes is None or len(new.data) < old.bytes

