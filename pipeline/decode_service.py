"""The decode service without HTTP: source key in, encoded image out (docs/serve.md).

:class:`DecodeService` turns a source key (``2024/img 1.jpg``) of an archive written by
``sgarc run`` into a PNG, JPEG or WebP, read only as ``bitstreams/<key>.sga`` (keys checked
by :func:`validate_key`; in a local archive a symlink is followed only while it stays
inside ``bitstreams/``). Whatever transport sits in front (``jobs.serve``), it keeps the
guarantees docs/serve.md lists: typed errors with their HTTP status (:class:`ServeError`),
bounded work (``max_pixels``, :class:`ByteBudget`, ``max_decodes``), a byte-bounded cache
(:class:`ByteLRU`, on cachetools) and single flight. :func:`fetch_decode` decodes one
stream from any fsspec URL (``sgarc decode``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cachetools

from codec.errors import BitstreamError, ModelError, SgarcError
from pipeline.keys import BITSTREAMS, bitstream_key, key_problem
from pipeline.keys import MAX_KEY_BYTES as MAX_KEY_BYTES  # re-exported

if TYPE_CHECKING:
    from pipeline.storage import Storage

# Heavier modules (numpy, Pillow, torch, fsspec) are imported where they are used, so that
# importing this module (the CLI does, to build its parser) stays cheap.

log = logging.getLogger("sgarc.serve")

DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_MAX_PIXELS = 100_000_000  # codec.images.DEFAULT_MAX_PIXELS (a test keeps them equal)
SERVE_MAX_PIXELS = 50_000_000  # per request in the service: well below sgarc decode's limit
# Peak memory of a decode and its PNG / JPEG / WebP encoding per padded pixel: about 60 B
# measured with the shipped models (M = 96: a 10048 x 10048 decode peaks at 5.7 GiB).
DECODE_BYTES_PER_PIXEL = 64
DEFAULT_DECODE_BYTES = 4 << 30  # decoded bytes in flight across all requests
DEFAULT_QUEUE_TIMEOUT = 10.0  # seconds a request waits for room before it gets 503
DEFAULT_CACHE_TTL = 600.0
DEFAULT_QUALITY = 90  # JPEG and WebP, unless the request asks

FORMATS = ("png", "webp", "jpeg")  # also the tie-break order of content negotiation
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_FORMAT_ALIASES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
# errnos of a path that cannot exist in the archive: 404 like a missing stream, not 503.
_NO_SUCH_PATH = frozenset(getattr(errno, name) for name in (
    "ENAMETOOLONG", "ENOTDIR", "EISDIR", "ELOOP", "EILSEQ") if hasattr(errno, name))


# ---------------------------------------------------------------------------------------------
# Errors and request values
# ---------------------------------------------------------------------------------------------


class ServeError(SgarcError):
    """A request that cannot be answered with an image; ``status`` is its HTTP status."""

    status = 500
    code = "internal_error"


class BadRequest(ServeError, ValueError):  # noqa: N818 - named after the HTTP status
    status = 400
    code = "bad_request"


class BadKey(BadRequest):
    """The key is malformed or would leave the archive."""

    code = "bad_key"


class NotFound(ServeError, LookupError):  # noqa: N818
    status = 404
    code = "not_found"


class CorruptStream(ServeError):  # noqa: N818
    """The stream exists but is not a valid sgarc bitstream (a BitstreamError)."""

    status = 422
    code = "corrupt_stream"


class ModelUnavailable(ServeError):  # noqa: N818
    """The stream names a model this installation does not have."""

    status = 500
    code = "model_unavailable"


class Unavailable(ServeError):  # noqa: N818
    """Storage failed (after its retries)."""

    status = 503
    code = "storage_unavailable"


class Busy(ServeError):  # noqa: N818
    """The decodes in flight use the memory budget and room did not free up in time."""

    status = 503
    code = "busy"


def validate_key(key: object) -> str:
    """The source key if it is acceptable, else BadKey saying why.

    Accepted: a non-empty relative '/'-separated path of at most MAX_KEY_BYTES UTF-8 bytes,
    without control characters (NUL included), backslashes, or empty / '.' / '..' segments
    (:func:`pipeline.keys.key_problem`, which the pipeline applies at planning, so that
    every archived key can be served). Percent-decoding is the HTTP layer's job and is done
    once, before this.
    """
    if not isinstance(key, str):
        raise BadKey(f"key must be a string, not {type(key).__name__}")
    if not key:
        raise BadKey("empty key: ask for /images/<key>, e.g. /images/2024/img%201.jpg")
    problem = key_problem(key)
    if problem is not None:
        raise BadKey(problem)
    return key


def normalize_format(fmt: str | None) -> str:
    """'png', 'jpeg' or 'webp' for a format name (jpg, JPEG, ...); BadRequest otherwise."""
    if fmt is None:
        return "png"
    name = _FORMAT_ALIASES.get(str(fmt).strip().lower())
    if name is None:
        raise BadRequest(f"unsupported format {fmt!r}; use png, jpeg or webp")
    return name


def normalize_quality(quality: int | str | None, fmt: str) -> int | None:
    """The quality to use (None for PNG, which is lossless); BadRequest when out of range."""
    if quality is None or quality == "":
        return None if fmt == "png" else DEFAULT_QUALITY
    try:
        value = int(quality)
    except (TypeError, ValueError):
        raise BadRequest(f"quality must be an integer from 1 to 100, not {quality!r}") from None
    if not 1 <= value <= 100:
        raise BadRequest(f"quality must be from 1 to 100, not {value}")
    return None if fmt == "png" else value


# ---------------------------------------------------------------------------------------------
# Cache and budget
# ---------------------------------------------------------------------------------------------


class ByteLRU:
    """A thread-safe LRU map bounded by the total size of its values, and optionally by age.

    cachetools does the bookkeeping (``getsizeof``: the size given to :meth:`put`); this adds
    the lock, the hit / miss counts and a per-item limit (default: a quarter of the budget),
    so that one large response cannot flush everything else.
    """

    def __init__(self, max_bytes: int, ttl: float | None = None,
                 max_item_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.max_item_bytes = self.max_bytes // 4 if max_item_bytes is None else max_item_bytes
        self._items = cachetools.TTLCache(self.max_bytes, ttl or math.inf, timer=clock,
                                          getsizeof=lambda item: item[1])  # (value, size)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, count: bool = True) -> Any | None:
        """The value, or None when absent or expired (``count``: update hits / misses)."""
        with self._lock:
            item = self._items.get(key)
            if count:
                self.hits += item is not None
                self.misses += item is None
        return None if item is None else item[0]

    def put(self, key: Hashable, value: Any, size: int) -> bool:
        """Keep ``value`` (of ``size`` bytes); False when it is too large to keep."""
        if size > self.max_item_bytes or size > self.max_bytes:
            return False
        with self._lock:
            self._items[key] = (value, size)
        return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": int(self._items.currsize),
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses}


class ByteBudget:
    """Bytes in flight across threads, granted first come, first served.

    ``reserve(size, timeout)`` holds ``min(size, capacity)`` bytes for a ``with`` block: it
    waits until the requests before it have been served and the bytes fit, for at most
    ``timeout`` seconds (None: no limit), then raises :class:`Busy`. A request larger than
    the whole budget is clamped to it, so it runs, alone.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("the byte budget must be > 0")
        self.capacity = int(capacity)
        self.in_flight = 0
        self.peak = 0  # the most bytes ever in flight at once
        self.refused = 0  # reservations that timed out
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    def acquire(self, size: int, timeout: float | None = None) -> int | None:
        """The bytes reserved (release them with :meth:`release`), or None on timeout."""
        size = min(max(int(size), 0), self.capacity)
        ticket = object()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self.in_flight + size > self.capacity:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self.refused += 1
                        return None
                    self._cond.wait(left)
                self.in_flight += size
                self.peak = max(self.peak, self.in_flight)
                return size
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now

    def release(self, size: int) -> None:
        with self._cond:
            self.in_flight -= size
            self._cond.notify_all()

    @contextlib.contextmanager
    def reserve(self, size: int, timeout: float | None = None):
        got = self.acquire(size, timeout)
        if got is None:
            raise Busy("the server is busy decoding other images; try again shortly")
        try:
            yield got
        finally:
            self.release(got)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"in_flight_bytes": self.in_flight, "max_bytes": self.capacity,
                    "peak_bytes": self.peak, "waiting": len(self._queue),
                    "refused": self.refused}


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendition:
    """One encoded response: the image bytes and what the HTTP layer says about them."""

    body: bytes
    content_type: str
    etag: str  # weak: the .sga's sha256 plus the variant (format, quality, strip)
    key: str
    fmt: str
    metadata: str  # RestoreReport.summary() of what went back into the image
    cache: str = "miss"  # "miss" (decoded for this call), "hit", "coalesced" (shared decode)


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def public_url(url: str) -> str:
    """A URL fit to show: no user:password@ part, no query (signed URLs keep secrets there)."""
    return _USERINFO.sub(r"\1", url).split("?", 1)[0].split("#", 1)[0]


class DecodeService:
    """Decoded images of one archive, by source key, with a byte-bounded LRU cache.

    ``archive`` is the archive root (a URL or path, the OUTPUT of ``sgarc run``) or a ready
    :class:`Storage` for it (e.g. one with other retry settings). Thread-safe.
    """

    def __init__(self, archive: str | os.PathLike[str] | Storage,
                 storage_options: dict | None = None, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache_ttl: float | None = DEFAULT_CACHE_TTL,
                 max_pixels: int = SERVE_MAX_PIXELS, device: str = "cpu",
                 registry=None, max_decodes: int | None = None,
                 decode_bytes: int = DEFAULT_DECODE_BYTES,
                 queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT) -> None:
        from pipeline.storage import Storage

        if isinstance(archive, Storage):
            if storage_options:
                raise ValueError("pass storage_options with a URL, not with a Storage")
            self.storage = archive
        else:
            self.storage = Storage(os.fspath(archive), storage_options)
        self.archive = public_url(self.storage.url)
        self.max_pixels = max_pixels
        self.device = device
        self.registry = registry  # None: the shipped models (codec.registry.REGISTRY)
        self.cache = ByteLRU(cache_bytes, cache_ttl)
        if max_decodes is None:
            max_decodes = max(1, min(4, os.cpu_count() or 1))
        self._decode_slots = threading.BoundedSemaphore(max_decodes)
        self.budget = ByteBudget(decode_bytes)
        self.queue_timeout = queue_timeout
        self._flights: dict[tuple, Future[Rendition]] = {}
        self._flights_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self.decodes = 0  # streams decoded (cache misses that got as far as decoding)

    def __repr__(self) -> str:
        return f"DecodeService({self.archive!r})"

    # -- public ----------------------------------------------------------------------------

    def get(self, key: str, fmt: str = "png", quality: int | None = None,
            strip_metadata: bool = False) -> tuple[bytes, str]:
        """(image bytes, content type) of the image stored under the source ``key``."""
        r = self.render(key, fmt, quality, strip_metadata)
        return r.body, r.content_type

    def render(self, key: str, fmt: str | None = "png", quality: int | str | None = None,
               strip_metadata: bool = False) -> Rendition:
        """Like :meth:`get`, with the ETag, the cache status and the metadata report."""
        return (self.cached(key, fmt, quality, strip_metadata)
                or self.render_missed(key, fmt, quality, strip_metadata))

    def cached(self, key: str, fmt: str | None = "png", quality: int | str | None = None,
               strip_metadata: bool = False) -> Rendition | None:
        """The cached rendition, or None (a miss); never touches storage or the decoder, so
        an event loop may call it. Validates as :meth:`render` does."""
        return self._hit(self._ident(key, fmt, quality, strip_metadata))

    def render_missed(self, key: str, fmt: str | None = "png",
                      quality: int | str | None = None,
                      strip_metadata: bool = False) -> Rendition:
        """:meth:`render` after :meth:`cached` missed: one decode for all who ask at once
        (single flight), cached for those who ask later. Blocks: call it from a thread."""
        ident = self._ident(key, fmt, quality, strip_metadata)
        with self._flights_lock:
            # A decode of this item may have finished (cached, then left the table) since.
            hit = self._hit(ident, count=False)
            if hit is not None:
                return hit
            flight = self._flights.get(ident)
            leader = flight is None
            if leader:
                flight = self._flights[ident] = Future()
        if not leader:
            return dataclasses.replace(flight.result(), cache="coalesced")  # or its error
        try:
            result = self._render(*ident)
            self.cache.put(ident, result, len(result.body) + len(ident[0]) + 256)
            flight.set_result(result)
            return result
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._flights_lock:
                del self._flights[ident]

    @staticmethod
    def _ident(key: str, fmt: str | None, quality: int | str | None, strip: bool) -> tuple:
        key = validate_key(key)
        fmt = normalize_format(fmt)
        return key, fmt, normalize_quality(quality, fmt), bool(strip)

    def _hit(self, ident: tuple, count: bool = True) -> Rendition | None:
        cached = self.cache.get(ident, count)
        return None if cached is None else dataclasses.replace(cached, cache="hit")

    def read_stream(self, key: str) -> bytes:
        """The raw .sga bytes of a source key; NotFound / Unavailable on failure.

        A path that cannot exist (a name too long for the filesystem, a file where a folder
        should be, a symlink loop, ...) is NotFound: only real storage faults are 503."""
        from pipeline.storage import StorageError, StorageNotFound

        key = validate_key(key)
        missing = NotFound(f"no image {key!r} in the archive")
        try:
            return self.storage.read_bytes(self._stream_key(key))
        except StorageNotFound:
            raise missing from None
        except StorageError as exc:
            cause = exc.__cause__
            if (isinstance(cause, IsADirectoryError | NotADirectoryError)
                    or (isinstance(cause, OSError) and cause.errno in _NO_SUCH_PATH)):
                raise missing from None
            log.warning("reading %r failed: %s", key, exc)
            raise Unavailable("the archive's storage is unavailable; try again later") from exc
        except ValueError as exc:  # the Storage's own key check (should not trigger)
            raise BadKey(str(exc)) from None

    def _stream_key(self, key: str) -> str:
        """The storage key to read for a source key (:func:`pipeline.keys.bitstream_key`).

        In a local archive, symlinks under ``bitstreams/`` are followed only while they stay
        inside it (``bitstreams/`` itself may be a link, e.g. to another disk): a link to
        any other file must not turn the service into a reader of that file. The resolved
        file is read, so the check and the read see the same path."""
        stream = bitstream_key(key)
        if self.storage.protocol != "file":
            return stream
        base = os.path.realpath(self.storage.full_path(BITSTREAMS))
        real = os.path.realpath(self.storage.full_path(stream))
        if real == base or os.path.commonpath([base, real]) != base:
            log.warning("%s leads out of the archive's %s/ (a symlink); refused", stream,
                        BITSTREAMS)
            raise NotFound(f"no image {key!r} in the archive")
        return f"{BITSTREAMS}/{os.path.relpath(real, base)}"

    def health(self) -> dict[str, Any]:
        from codec.registry import REGISTRY, entries

        models = [e.id for e in entries(self.registry or REGISTRY)]
        return {"status": "ok" if models else "no models installed", "archive": self.archive,
                "models": models, "cache": {**self.cache.stats(), "decodes": self.decodes},
                "decoding": {**self.budget.stats(), "max_pixels": self.max_pixels}}

    def clear_cache(self) -> None:
        self.cache.clear()

    # -- internals -------------------------------------------------------------------------

    def _render(self, key: str, fmt: str, quality: int | None, strip: bool) -> Rendition:
        from codec.api import decode
        from codec.bitstream import parse

        data = self.read_stream(key)
        digest = hashlib.sha256(data).hexdigest()
        try:  # the header (checked: size limit, checksum) says what decoding it will take
            header = parse(data, self.max_pixels).header
        except BitstreamError as exc:
            raise self._refusal(key, exc, strip) from None
        need = header.padded_pixels * DECODE_BYTES_PER_PIXEL + len(data)
        with self.budget.reserve(need, self.queue_timeout), self._decode_slots:
            with self._counter_lock:
                self.decodes += 1
            try:
                decoded = decode(data, max_pixels=self.max_pixels, device=self.device,
                                 read_metadata=not strip,
                                 **({"registry": self.registry} if self.registry else {}))
            except BitstreamError as exc:
                raise self._refusal(key, exc, strip) from None
            body, report = encode_image(decoded, fmt, quality, strip)
            del decoded
        variant = fmt + (f"-q{quality}" if quality is not None else "") + ("-strip" if strip
                                                                          else "")
        return Rendition(body=body, content_type=CONTENT_TYPES[fmt],
                         etag=f'W/"{digest}.{variant}"', key=key, fmt=fmt,
                         metadata=report.summary())

    @staticmethod
    def _refusal(key: str, exc: BitstreamError, strip: bool) -> ServeError:
        if isinstance(exc.__cause__, ModelError):
            log.error("%s: %s", key, exc)
            return ModelUnavailable(f"image {key!r}: {exc}")
        hint = "" if strip else " (if only its metadata is damaged, ?strip=1 may help)"
        return CorruptStream(f"image {key!r} has a corrupt stream: "
                             f"{content_free(str(exc))}{hint}")


_QUOTED = re.compile(r"""(?:\bb)?['"]""")  # where a repr of bytes or text from the stream starts


def content_free(reason: str) -> str:
    """A codec error message cut before anything it quotes from the stream.

    BitstreamError messages may quote the stream's own bytes (its first bytes, a section
    tag, a model id); a 422 body must not, or a link to another file would leak that file.
    Numbers (sizes, versions) stay: they say what is wrong and quote nothing."""
    quoted = _QUOTED.search(reason)
    if quoted is None:
        return reason
    reason = reason[:quoted.start()]
    if reason.count("(") > reason.count(")"):
        reason = reason[:reason.rfind("(")]
    return reason.rstrip(" (:,;") or "not a valid sgarc bitstream"


def encode_image(decoded, fmt: str, quality: int | None = None,
                 strip_metadata: bool = False):
    """(file bytes, RestoreReport) of a DecodedImage as png / jpeg / webp, in memory.

    The same metadata rules as ``DecodedImage.save``: the stream's EXIF / ICC / XMP go back
    where the format takes them; if Pillow refuses them, the pixels are written without
    and the report says why. JPEG has no alpha: an alpha plane is composited onto white.
    A stream that holds the source file (jpeg-lossless and original routes, codec.routes)
    answers a request in the file's format with the file itself, byte for byte, whatever
    the quality asked (re-encoding it could only lose).
    """
    from PIL import Image

    from codec.metadata import RestoreReport, save_params

    fmt = normalize_format(fmt)
    if not strip_metadata and decoded.original_for(_PILLOW_FORMATS[fmt]):
        kept = list(decoded.metadata.kept) if decoded.metadata is not None else []
        return decoded.source, RestoreReport(restored=kept)
    img = decoded.to_pil()
    if fmt == "jpeg" and img.mode in ("RGBA", "LA"):
        mode = "RGB" if img.mode == "RGBA" else "L"
        base = Image.new(mode, img.size, (255,) * len(mode))
        base.paste(img, mask=img.getchannel("A"))
        img = base
    pil_format = _PILLOW_FORMATS[fmt]
    params: dict[str, Any] = {}
    if fmt != "png":
        params["quality"] = DEFAULT_QUALITY if quality is None else quality
    if strip_metadata:
        extra, report = {}, RestoreReport(stripped=True)
    else:
        extra, report = save_params(decoded.metadata, pil_format, img.mode,
                                    decoded.header.orientation)

    def save(options: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=pil_format, **options)
        return buf.getvalue()

    try:
        return save({**extra, **params}), report
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not extra:
            raise
        report = RestoreReport(skipped=[(name, f"refused by the {pil_format} writer ({exc})")
                                        for name in report.restored] + report.skipped)
        return save(params), report


def read_url(url: str | os.PathLike[str], storage_options: dict | None = None) -> bytes:
    """:func:`pipeline.storage.read_url` with the service's errors: NotFound, Unavailable,
    BadRequest (a URL that names no file or an unknown protocol)."""
    from pipeline.storage import StorageError, StorageNotFound
    from pipeline.storage import read_url as read

    url = os.fspath(url)
    try:
        return read(url, storage_options)
    except StorageNotFound:
        raise NotFound(f"no such file: {public_url(url)}") from None
    except StorageError as exc:
        raise Unavailable(str(exc)) from exc
    except (ValueError, ImportError) as exc:
        raise BadRequest(f"cannot read {public_url(url)}: {exc}") from None


def fetch_decode(url: str | os.PathLike[str], out_path: str | os.PathLike[str],
                 storage_options: dict | None = None, strip_metadata: bool = False, *,
                 format: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 device: str = "cpu"):
    """Decode the stream at ``url`` (any fsspec URL: ``s3://bucket/archive/bitstreams/
    x.jpg.sga``, a local path, ...) into the local file ``out_path``, written atomically
    with its EXIF / ICC / XMP (unless ``strip_metadata``); the format follows the
    extension unless given. Returns the RestoreReport. Raises NotFound, Unavailable,
    BadRequest (the URL), codec BitstreamError / ImageError - all SgarcErrors."""
    from codec.api import decode

    data = read_url(url, storage_options)
    decoded = decode(data, max_pixels=max_pixels, device=device,
                     read_metadata=not strip_metadata)
    return decoded.save(out_path, format, strip_metadata=strip_metadata)
