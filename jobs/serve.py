"""Decode on demand: serve an archive's images over HTTP, and decode one stream from any URL.

An archive written by ``sgarc run`` holds ``<archive>/bitstreams/<source key>.sga``. This
module turns a request for a *source key* (``2024/img 1.jpg``) into the decoded image, in
three layers that share one behaviour (docs/serve.md):

``DecodeService`` (no HTTP, no framework)
    ``get(key, fmt="png", quality=None, strip_metadata=False) -> (bytes, content_type)`` and
    ``render(...) -> Rendition`` (with ETag, cache status, metadata report). The key is
    validated (:func:`validate_key`: not empty, at most ``MAX_KEY_BYTES`` UTF-8 bytes, no
    NUL or other control character, no backslash, not absolute, no empty, ``.`` or ``..``
    segment), then read as ``bitstreams/<key>.sga`` through :class:`pipeline.storage.Storage`
    (any fsspec URL, retries with backoff; a name over 255 bytes in its shortened form,
    :func:`pipeline.keys.bitstream_key`, as the pipeline wrote it). The key is only ever
    appended to ``bitstreams/`` and suffixed with ``.sga``, and in a local archive a symlink
    is followed only while it stays inside ``bitstreams/``, so a request can reach nothing
    but streams in the archive. Errors are typed, each with its HTTP status: :class:`BadKey`
    / :class:`BadRequest` 400, :class:`NotFound` 404 (no such stream, or a path that cannot
    exist, e.g. a name too long), :class:`CorruptStream` 422 (``codec.errors.BitstreamError``:
    checksum, truncation, corrupt metadata - ``strip`` still gives the pixels, since the
    META section is then not read; the message never quotes the stream's bytes),
    :class:`Unavailable` 503 (storage failed after its retries), :class:`Busy` 503 (no
    decoding memory came free in time), :class:`ModelUnavailable` 500 (the stream names a
    model this server does not have).

    Output: PNG (default), JPEG or WebP, with the stream's EXIF / ICC / XMP written back as
    ``DecodedImage.save`` does (orientation 1, since pixels are upright; a field the
    container refuses is skipped, never an error) unless ``strip_metadata``. JPEG and WebP
    use quality 90 unless asked; JPEG has no alpha, so an image with alpha is composited onto
    white for JPEG (PNG and WebP keep it).

    Caching: encoded responses are kept in a thread-safe LRU keyed by (key, format, quality,
    strip), bounded by total bytes (``cache_bytes``, default 256 MiB; one response may use
    at most a quarter of it) and by age (``cache_ttl``, default 600 s, so a stream that a
    later run replaced is served fresh within that time; ``None``: no expiry). Concurrent
    requests for the same representation decode once (single flight): the first decodes,
    the others wait for its result. At most ``max_decodes`` decodes run at once (default:
    the CPU count, at most 4), which bounds memory when many different images are asked
    for at once.

    Limits: a stream may describe at most ``max_pixels`` pixels (default
    ``SERVE_MAX_PIXELS`` = 50 MP, half of what ``sgarc decode`` allows: 422 beyond), and
    the decodes in flight together may need at most ``decode_bytes`` of memory (default
    4 GiB), estimated from each stream's header before anything is decoded
    (``DECODE_BYTES_PER_PIXEL`` per padded pixel). A request that does not fit waits its
    turn (first come, first served) for up to ``queue_timeout`` seconds (default 10), then
    gets :class:`Busy` (503 with ``Retry-After``); one larger than the whole budget runs
    alone. A stream too short for the image its header declares is refused (422) by the
    codec before any of that memory is taken (docs/bitstream.md, Work bound).

``HttpApp`` (HTTP semantics, no transport) and :func:`make_server` (stdlib ``http.server``)
    ``GET``/``HEAD /images/<key>``: the path after ``/images/`` is percent-decoded exactly
    once, as UTF-8 (``%2F`` is a ``/``; a double-encoded ``%252e`` stays the literal
    ``%2e``); query ``format=png|jpeg|jpg|webp``, ``quality=1..100``, ``strip=1|0``.
    Without ``format`` the ``Accept`` header decides (RFC 9110 q-values; specific types beat
    ``image/*`` beat ``*/*``; ties go PNG, WebP, JPEG; an Accept naming none of them gets PNG
    rather than 406). Responses carry ``ETag`` (weak: ``W/"<sha256 of the .sga>.<variant>"``,
    so ``If-None-Match`` gets 304), ``Cache-Control`` (default ``private, max-age=300``:
    photos may carry GPS positions), ``Vary: Accept``, ``Content-Disposition: inline`` with
    the key's base name, ``X-Cache: miss|hit|coalesced`` and ``X-Sgarc-Metadata`` (what
    went back). ``GET /healthz``: 200 JSON ``{"status": "ok", "archive": <URL without
    credentials>, "models": [...], "cache": {...}}`` (503 when no model is installed).
    Other methods on these paths: 405 with ``Allow: GET, HEAD``; methods ``http.server``
    does not know: 501; other paths: 404. Errors are small JSON bodies ``{"error": code,
    "message": text, "status": n}``; 503 bodies stay generic (details go to the log).
    The server is threaded (one thread per connection, HTTP/1.1 keep-alive, idle
    connections closed after 60 s) and writes an access log to stderr unless quiet.

Ray Serve (:class:`DecodeDeployment`, :func:`serve_deployment`, :func:`build_app`)
    The same ``HttpApp`` behind a Ray Serve ingress (Starlette request in, Starlette
    response out, decoding in a worker thread); each replica has its own cache. Ray Serve
    is imported only inside these functions, so this module imports without it (install
    the ``serve`` extra: ``pip install 'sgarc[serve]'``).

:func:`fetch_decode` / :func:`read_url`
    ``sgarc decode URL -o out.png`` for any fsspec URL: the object is read through a
    Storage rooted at the URL's parent (retries), decoded and saved atomically with its
    metadata; returns the ``RestoreReport``.

:func:`register` adds the ``serve`` command to the ``sgarc`` parser; :func:`run_server`
blocks, prints the URL and stops cleanly on Ctrl-C or SIGTERM. ``python -m jobs.serve
--archive URL`` runs the same command stand-alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlsplit

from codec.errors import BitstreamError, ModelError, SgarcError
from jobs.options import STORAGE_OPTIONS_HELP, parse_storage_options
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
DEFAULT_CACHE_CONTROL = "private, max-age=300"
DEFAULT_QUALITY = 90  # JPEG and WebP, unless the request asks

FORMATS = ("png", "webp", "jpeg")  # also the tie-break order of content negotiation
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_FORMAT_ALIASES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
# errnos of a path that cannot exist in the archive: 404 like a missing stream, not 503.
_NO_SUCH_PATH = frozenset(getattr(errno, name) for name in (
    "ENAMETOOLONG", "ENOTDIR", "EISDIR", "ELOOP", "EILSEQ") if hasattr(errno, name))
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


# ---------------------------------------------------------------------------------------------
# Errors
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


# ---------------------------------------------------------------------------------------------
# Keys and request values
# ---------------------------------------------------------------------------------------------


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


def parse_flag(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise BadRequest(f"{name} must be 1 or 0, not {value!r}")


def negotiate(accept: str | None) -> str:
    """The output format for an Accept header (PNG when absent or when it names none of ours).

    Each format gets the q-value of the most specific media range that matches it
    (``image/webp`` over ``image/*`` over ``*/*``); the highest q wins, ties go in
    FORMATS order (PNG first), so a browser's ``image/webp,image/*,*/*`` gets PNG.
    """
    if not accept:
        return "png"
    ranges: dict[str, float] = {}
    for element in accept.split(","):
        media, *params = (p.strip() for p in element.split(";"))
        media = media.lower()
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        ranges.setdefault(media, q)
    best, best_q = "png", 0.0
    for fmt in FORMATS:
        mime = CONTENT_TYPES[fmt]
        for candidate in ((mime, "image/jpg") if fmt == "jpeg" else (mime,)) + ("image/*", "*/*"):
            if candidate in ranges:
                q = ranges[candidate]
                break
        else:
            q = 0.0
        if q > best_q:
            best, best_q = fmt, q
    return best


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


class ByteLRU:
    """A thread-safe LRU map bounded by the total size of its values (and optionally age).

    Values larger than ``max_item_bytes`` (default: a quarter of the budget) are not kept.
    """

    def __init__(self, max_bytes: int, ttl: float | None = None,
                 max_item_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.max_item_bytes = self.max_bytes // 4 if max_item_bytes is None else max_item_bytes
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[Hashable, tuple[Any, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, count: bool = True) -> Any | None:
        """The value, or None when absent or expired (``count``: update hits / misses)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and self.ttl is not None and self._clock() - item[2] > self.ttl:
                self._drop(key)
                item = None
            if item is None:
                self.misses += count
                return None
            self._items.move_to_end(key)
            self.hits += count
            return item[0]

    def put(self, key: Hashable, value: Any, size: int) -> bool:
        """Keep ``value`` (of ``size`` bytes); False when it is too large to keep."""
        if size > self.max_item_bytes or size > self.max_bytes:
            return False
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (value, size, self._clock())
            self.bytes += size
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
        return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def _drop(self, key: Hashable) -> None:
        _, size, _ = self._items.pop(key)
        self.bytes -= size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes,
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


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    result: Rendition | None = None
    error: BaseException | None = None


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
        self._flights: dict[tuple, _Flight] = {}
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
        key = validate_key(key)
        fmt = normalize_format(fmt)
        quality = normalize_quality(quality, fmt)
        ident = (key, fmt, quality, bool(strip_metadata))
        cached = self.cache.get(ident)
        if cached is not None:
            return dataclasses.replace(cached, cache="hit")
        with self._flights_lock:
            flight = self._flights.get(ident)
            leader = flight is None
            if leader:
                # A decode of this item may have finished (cached, then left the table)
                # between the cache lookup above and this lock.
                cached = self.cache.get(ident, count=False)
                if cached is not None:
                    return dataclasses.replace(cached, cache="hit")
                flight = self._flights[ident] = _Flight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return dataclasses.replace(flight.result, cache="coalesced")
        try:
            result = self._render(*ident)
            self.cache.put(ident, result, len(result.body) + len(key) + 256)
            flight.result = result
            return result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                del self._flights[ident]
            flight.done.set()

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


# ---------------------------------------------------------------------------------------------
# HTTP semantics, independent of the transport
# ---------------------------------------------------------------------------------------------


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    @property
    def has_body(self) -> bool:
        """Whether the status allows a body (and so a Content-Length)."""
        return self.status >= 200 and self.status not in (204, 304)


def _json(status: int, payload: dict, extra: list[tuple[str, str]] | None = None
          ) -> HttpResponse:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"
    headers = [("Content-Type", "application/json; charset=utf-8"),
               ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
    return HttpResponse(status, headers + (extra or []), body)


def error_response(status: int, code: str, message: str,
                   extra: list[tuple[str, str]] | None = None) -> HttpResponse:
    return _json(status, {"error": code, "message": message, "status": status}, extra)


def _header_text(text: str) -> str:
    """A header value from any text: printable ASCII only."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:500]


def _split_target(target: str) -> tuple[str, str]:
    """(raw path, raw query) of a request target (origin form, or absolute form)."""
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    return path.split("#", 1)[0], query.split("#", 1)[0]


class HttpApp:
    """GET/HEAD ``/images/<key>`` and ``/healthz`` over a DecodeService, as plain values.

    :meth:`handle` takes the method, the raw request target (still percent-encoded) and a
    case-insensitive header mapping (``.get``) and returns an HttpResponse; the stdlib
    server and the Ray Serve ingress are thin transports around it.
    """

    ALLOW = "GET, HEAD"

    def __init__(self, service: DecodeService, cache_control: str = DEFAULT_CACHE_CONTROL
                 ) -> None:
        self.service = service
        self.cache_control = cache_control

    def handle(self, method: str, target: str, headers: Mapping[str, str] | Any
               ) -> HttpResponse:
        method = method.upper()
        try:
            path, query = _split_target(target)
            if path == "/healthz":
                route = self._health
            elif path == "/images" or path.startswith("/images/"):
                route = self._image
            else:
                return error_response(404, "not_found", "no such endpoint; use "
                                      "/images/<key> or /healthz")
            if method not in ("GET", "HEAD"):
                return error_response(405, "method_not_allowed",
                                      f"{method} is not allowed here; use GET or HEAD",
                                      [("Allow", self.ALLOW)])
            return route(path, query, headers)
        except ServeError as exc:
            extra = [("Retry-After", "5")] if exc.status == 503 else None
            return error_response(exc.status, exc.code, str(exc), extra)
        except Exception:
            log.exception("internal error answering %s %s", method, target[:200])
            return error_response(500, "internal_error", "internal error (see the server log)")

    def _health(self, path: str, query: str, headers) -> HttpResponse:
        payload = self.service.health()
        return _json(200 if payload["status"] == "ok" else 503, payload)

    def _image(self, path: str, query: str, headers) -> HttpResponse:
        raw_key = path[len("/images/"):]
        try:
            # Transports hand over the target as latin-1 text (http.server, ASGI raw_path),
            # so raw UTF-8 bytes in it survive the round trip; decode everything as UTF-8.
            raw = raw_key.encode("latin-1")
        except UnicodeEncodeError:
            raw = raw_key.encode("utf-8", "surrogatepass")
        try:
            key = unquote_to_bytes(raw).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise BadKey("key is not valid UTF-8 after percent-decoding") from None
        try:
            params = dict(parse_qsl(query, keep_blank_values=True, encoding="utf-8",
                                    errors="strict"))
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("query string is not valid UTF-8") from None
        fmt = params.get("format") or negotiate(headers.get("Accept"))
        strip = parse_flag(params.get("strip", "0"), "strip")
        r = self.service.render(key, fmt, params.get("quality"), strip)
        common = [("ETag", r.etag), ("Cache-Control", self.cache_control), ("Vary", "Accept")]
        if _etag_matches(headers.get("If-None-Match"), r.etag):
            return HttpResponse(304, common)
        name = r.key.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "image"
        name += ".jpg" if r.fmt == "jpeg" else "." + r.fmt
        return HttpResponse(200, [
            ("Content-Type", r.content_type), *common,
            ("Content-Disposition", f"inline; filename*=UTF-8''{quote(name, safe='')}"),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Cache", r.cache),
            ("X-Sgarc-Metadata", _header_text(r.metadata)),
        ], r.body)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2) of If-None-Match against our ETag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in if_none_match.split(","))


# ---------------------------------------------------------------------------------------------
# The stdlib server
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: DecodeHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "sgarc-serve"
    timeout = 60  # idle keep-alive connections are closed after this many seconds

    def _dispatch(self) -> None:
        response = self.server.app.handle(self.command, self.path, self.headers)
        # A request body is never read: close the connection rather than misparse it.
        length = self.headers.get("Content-Length", "0").strip()
        if self.headers.get("Transfer-Encoding") or length not in ("", "0"):
            self.close_connection = True
        try:
            self.send_response(response.status)
            for name, value in response.headers:
                self.send_header(name, value)
            if response.has_body:
                self.send_header("Content-Length", str(len(response.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and response.has_body and response.body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to answer

    # http.server looks up do_<METHOD>; methods it knows no handler for get its 501.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815
    do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _dispatch  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)


class DecodeHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server around an HttpApp; ``url`` is where it listens."""

    daemon_threads = True
    app: HttpApp
    quiet: bool

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def url(self) -> str:
        host = self.server_name
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.server_port}"


class _DecodeHTTPServer6(DecodeHTTPServer):
    address_family = socket.AF_INET6


def make_server(service: DecodeService, host: str = "127.0.0.1", port: int = 0, *,
                quiet: bool = False, cache_control: str = DEFAULT_CACHE_CONTROL
                ) -> DecodeHTTPServer:
    """A bound, not yet serving, threaded HTTP server; call ``serve_forever()`` (in a
    thread if need be), ``shutdown()`` and ``server_close()``. ``port=0`` picks a free port
    (see ``server.url``); ``quiet`` turns the access log off."""
    cls = _DecodeHTTPServer6 if ":" in host else DecodeHTTPServer
    server = cls((host, port), _Handler)
    server.app = HttpApp(service, cache_control)
    server.quiet = quiet
    return server


def run_server(archive: str | Storage, host: str = "127.0.0.1", port: int = 8080, *,
               storage_options: dict | None = None, quiet: bool = False,
               cache_control: str = DEFAULT_CACHE_CONTROL, out=None,
               **service_options: Any) -> int:
    """Serve ``archive`` until Ctrl-C (or SIGTERM); prints the URL first. Returns 0."""
    out = out or sys.stdout
    service = DecodeService(archive, storage_options, **service_options)
    server = make_server(service, host, port, quiet=quiet, cache_control=cache_control)
    print(f"sgarc serve: {service.archive} at {server.url}/images/<key> "
          f"(health: {server.url}/healthz); Ctrl-C to stop", file=out, flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("sgarc serve: stopped", file=out, flush=True)
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


# ---------------------------------------------------------------------------------------------
# Ray Serve
# ---------------------------------------------------------------------------------------------


class DecodeDeployment:
    """Ray Serve ingress: a DecodeService per replica behind the same HttpApp.

    Plain class (Ray Serve wraps it in :func:`serve_deployment`), so it imports and tests
    without Ray. ``__call__`` takes a Starlette request and returns a Starlette response.
    """

    def __init__(self, archive: str, storage_options: dict | None = None,
                 service_options: dict | None = None,
                 cache_control: str = DEFAULT_CACHE_CONTROL) -> None:
        service = DecodeService(archive, storage_options, **(service_options or {}))
        self.app = HttpApp(service, cache_control)

    async def __call__(self, request):
        from starlette.responses import Response

        scope = request.scope
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else quote(scope.get("path", "/"), safe="/")
        root = scope.get("root_path", "")  # Serve's route prefix, when it is not "/"
        if root and root != "/" and path.startswith(root):
            path = path[len(root):] or "/"
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + ("?" + query if query else "")
        method = request.method
        response = await asyncio.to_thread(self.app.handle, method, target, request.headers)
        headers = dict(response.headers)
        if response.has_body:
            headers["Content-Length"] = str(len(response.body))
        body = response.body if method != "HEAD" and response.has_body else b""
        return Response(content=body, status_code=response.status, headers=headers)


def serve_deployment(archive: str, storage_options: dict | None = None, *,
                     num_replicas: int | str = 1, num_cpus: float = 1.0,
                     max_ongoing_requests: int = 8, name: str = "sgarc-decode",
                     cache_control: str = DEFAULT_CACHE_CONTROL, **service_options: Any):
    """A Ray Serve application (``Deployment.bind(...)``) serving ``archive``.

    ``serve.run(serve_deployment("s3://bucket/archive", num_replicas=4))`` exposes the same
    endpoints as :func:`make_server` on Serve's HTTP proxy. ``num_replicas="auto"`` turns
    on Serve's autoscaling; ``service_options`` go to DecodeService (``cache_bytes``,
    ``max_pixels``, ``device``, ...). ``storage_options`` travel to the replicas as
    constructor arguments: prefer credentials from the environment or an instance role.
    """
    from ray import serve

    deployment = serve.deployment(
        DecodeDeployment, name=name, num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=max_ongoing_requests)
    return deployment.bind(archive, storage_options, service_options, cache_control)


def build_app(args: dict[str, str]):
    """Application builder for ``serve run jobs.serve:build_app archive=URL [replicas=N]
    [storage_options=JSON] [cache_mb=256] [max_pixels=N] [decode_mb=4096] [queue_timeout=10]
    [device=cpu] [num_cpus=1]``."""
    args = dict(args)
    if not args.get("archive"):
        raise ValueError("build_app needs archive=<URL of the archive>")
    options = parse_storage_options(args.get("storage_options"))  # JSON or @file, ${ENV}
    replicas: int | str = args.get("replicas", "1")
    replicas = replicas if replicas == "auto" else int(replicas)
    service: dict[str, Any] = {"cache_bytes": int(float(args.get("cache_mb", 256)) * (1 << 20))}
    if args.get("max_pixels"):
        service["max_pixels"] = int(args["max_pixels"])
    if args.get("decode_mb"):
        service["decode_bytes"] = int(float(args["decode_mb"]) * (1 << 20))
    if args.get("queue_timeout"):
        service["queue_timeout"] = float(args["queue_timeout"])
    if args.get("device"):
        service["device"] = args["device"]
    return serve_deployment(args["archive"], options, num_replicas=replicas,
                            num_cpus=float(args.get("num_cpus", 1)), **service)


def _run_ray_serve(args, options: dict | None, service: dict[str, Any]) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise SgarcError(f"--ray-serve needs Ray Serve: pip install 'sgarc[serve]' ({exc})"
                         ) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(serve_deployment(args.archive, options, num_replicas=args.replicas,
                                   **service), name="sgarc", route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"sgarc serve: {public_url(args.archive)} on Ray Serve ({args.replicas} "
              f"replica(s)) at {url}/images/<key> (health: {url}/healthz); Ctrl-C to stop",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1.0)
        print("sgarc serve: stopped", flush=True)
    finally:
        with contextlib.suppress(Exception):
            serve.delete("sgarc")
        if started:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    return 0


# ---------------------------------------------------------------------------------------------
# One stream from any URL
# ---------------------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, str]:
    """(parent URL, object name) of a file URL or path."""
    from fsspec.core import split_protocol

    protocol, path = split_protocol(url)
    head, sep, name = path.rpartition("/")
    if not name:
        raise BadRequest(f"{public_url(url)} names no file")
    if not sep:
        head = "" if protocol else "."
    elif not head:
        head = "/"
    return (f"{protocol}://{head}" if protocol else head), name


def read_url(url: str | os.PathLike[str], storage_options: dict | None = None) -> bytes:
    """The bytes of one object at any fsspec URL or local path, read with retries."""
    from pipeline.storage import Storage, StorageError, StorageNotFound

    url = os.fspath(url)
    parent, name = _split_url(url)
    try:
        return Storage(parent, storage_options).read_bytes(name)
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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive", required=True, metavar="URL",
                   help="the archive root (OUTPUT of `sgarc run`): a folder or any fsspec "
                        "URL (s3://bucket/archive, gs://..., file://...)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free)")
    p.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_BYTES / (1 << 20),
                   help="memory for decoded responses, in MiB (default: 256; 0: no cache)")
    p.add_argument("--cache-ttl", type=float, default=DEFAULT_CACHE_TTL,
                   help="seconds a cached response is served before it is decoded again "
                        "(default: 600; 0: no expiry)")
    p.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=f"{STORAGE_OPTIONS_HELP}, e.g. '{{\"key\": \"${{AWS_ACCESS_KEY_ID}}\", "
                        "\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'")
    p.add_argument("--max-pixels", type=int, default=SERVE_MAX_PIXELS,
                   help="refuse streams that describe larger images (422; default: "
                        f"{SERVE_MAX_PIXELS:,}, half of what `sgarc decode` allows)")
    p.add_argument("--decode-memory-mb", type=float, default=DEFAULT_DECODE_BYTES / (1 << 20),
                   help="memory the decodes in flight may need together, in MiB, estimated "
                        f"from each stream's header at {DECODE_BYTES_PER_PIXEL} bytes per "
                        "pixel (default: 4096); a request that does not fit waits")
    p.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT,
                   help="seconds a request waits for decoding memory before it gets 503 "
                        "with Retry-After (default: 10)")
    p.add_argument("--device", default="cpu", help="torch device for synthesis (default: cpu)")
    p.add_argument("--decoders", type=int, default=None,
                   help="decodes at once (default: the CPU count, at most 4)")
    p.add_argument("--cache-control", default=DEFAULT_CACHE_CONTROL,
                   help=f"Cache-Control of image responses (default: {DEFAULT_CACHE_CONTROL!r})")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--ray-serve", action="store_true",
                   help="deploy on Ray Serve (needs the serve extra) instead of the built-in "
                        "threaded server")
    p.add_argument("--replicas", default=1, type=lambda v: v if v == "auto" else int(v),
                   help="Ray Serve replicas (default: 1; 'auto': autoscaling)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --ray-serve (default: an in-process local Ray)")


def cmd_serve(args) -> int:
    options = parse_storage_options(args.storage_options)
    if args.cache_mb < 0:
        raise SgarcError("--cache-mb must be >= 0")
    if args.max_pixels < 1:
        raise SgarcError("--max-pixels must be >= 1")
    if args.decode_memory_mb <= 0:
        raise SgarcError("--decode-memory-mb must be > 0")
    if args.queue_timeout < 0:
        raise SgarcError("--queue-timeout must be >= 0")
    service: dict[str, Any] = {"cache_bytes": int(args.cache_mb * (1 << 20)),
                               "cache_ttl": args.cache_ttl or None,
                               "max_pixels": args.max_pixels, "device": args.device,
                               "max_decodes": args.decoders,
                               "decode_bytes": max(1, int(args.decode_memory_mb * (1 << 20))),
                               "queue_timeout": args.queue_timeout}
    if args.ray_serve:
        return _run_ray_serve(args, options, {**service, "cache_control": args.cache_control})
    try:
        return run_server(args.archive, args.host, args.port, storage_options=options,
                          quiet=args.quiet, cache_control=args.cache_control, **service)
    except (ValueError, ImportError) as exc:  # a bad archive URL or an unknown protocol
        raise SgarcError(f"--archive {public_url(args.archive)}: {exc}") from None
    except OSError as exc:  # the address is in use, not ours, ...
        raise SgarcError(f"cannot listen on {args.host}:{args.port}: {exc}") from None


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sgarc serve`` to the CLI's subparsers (``func=cmd_serve``)."""
    p = subparsers.add_parser(
        "serve", help="serve an archive's images over HTTP, decoded on demand",
        description="Serve the images of an archive written by `sgarc run`: GET "
        "/images/<source key> returns the decoded image (PNG; JPEG or WebP with ?format= or "
        "an Accept header; ?strip=1 drops EXIF / ICC / XMP), GET /healthz the server's "
        "state. Responses are cached in memory (LRU). See docs/serve.md.")
    _add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.serve --archive URL ...``: the serve command on its own."""
    parser = argparse.ArgumentParser(prog="python -m jobs.serve",
                                     description="sgarc serve, stand-alone (docs/serve.md)")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except SgarcError as exc:
        print(f"sgarc serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
