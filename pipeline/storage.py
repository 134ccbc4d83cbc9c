"""Object storage through fsspec URLs: one small, retrying, picklable front for every backend.

The pipeline reads images from and writes bitstreams and Parquet parts to "a storage root":
a local directory (bare path or ``file://``), ``s3://``, ``gs://`` or ``memory://``. The
same code path serves all of them (DESIGN.md, decision 7); what differs is handled here:

* **Atomic writes** (decision 5). A job is resumable because "the part exists" means "the
  part is complete". Locally we write a temp file ``.sgarc-<16 hex>.tmp`` in the target's
  directory, fsync it and ``os.replace`` it over the target, so readers see the old file or
  the new one, never half of one; a crash leaves at most a temp file, which listings skip.
  The temp name has a fixed short length, so any final name the filesystem allows (255
  bytes) can be written. On object stores a single PUT (``pipe_file``) is atomic already.
* **Retries.** Network stores fail transiently (connection resets, throttling, 5xx). Each
  operation is retried with capped exponential backoff and jitter; permanent errors (a
  missing object, a denied request, a bad argument) fail at once. Either way the caller
  gets a :class:`StorageError` naming the operation and the URL, with the cause chained.
  The SDK underneath (botocore, gcsfs) retries single requests too; these retries sit on
  top and cover the whole operation.
* **Fresh listings.** fsspec caches directory listings; a resumable job asks "does this
  part exist?" after other workers wrote, so listings caches are off and invalidated.
* **Pickling.** A :class:`Storage` travels to Ray actors: it holds only the URL and the
  options and builds the filesystem lazily in each process.
* **Secrets.** ``storage_options`` may hold credentials; they never appear in ``repr``
  or in error messages.

This module depends on fsspec only (no Ray, no codec).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol

from codec.files import atomic_write, is_temp_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")

# How many object lookups list_manifest runs at once (network stores are latency bound).
_MANIFEST_WORKERS = 16
_MANIFEST_BATCH = 10_000  # keys looked up per batch of a streamed manifest

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a storage root.

    ``key`` is relative to the root ('/'-separated, never starting with '/'). ``version``
    changes when the object's content changes: the ETag on S3/GCS, the mtime locally, ""
    where the store offers neither (memory://). Jobs record it to notice changed sources.
    """

    key: str
    size: int
    version: str


def is_image_key(key: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """An image by its extension (lower-case ``extensions``), not hidden: no segment starts
    with '.' (macOS ``._IMG.jpg`` forks, NAS thumbnail folders, our own temp files)."""
    return (key.lower().endswith(extensions)
            and not any(part.startswith(".") for part in key.split("/")))


class StorageError(Exception):
    """A storage operation failed (after retries, if the failure looked transient).

    ``op`` is the operation ("read", "write", "list", ...), ``target`` the URL it acted on
    (credentials removed), ``attempts`` how many times it was tried, ``transient`` whether
    the last failure looked transient (so a caller may retry later, e.g. the whole shard).
    """

    missing = False

    def __init__(self, message: str, *, op: str = "", target: str = "", attempts: int = 0,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.op = op
        self.target = target
        self.attempts = attempts
        self.transient = transient

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StorageNotFound(StorageError, FileNotFoundError):  # noqa: N818 - reads as a noun
    """The object (or bucket) does not exist. Also a FileNotFoundError, so ``except
    FileNotFoundError`` keeps working; never retried."""

    missing = True


# ---------------------------------------------------------------------------------------------
# Error classification
# ---------------------------------------------------------------------------------------------

# Retrying cannot fix these: the object is not there, access is denied, the call is wrong.
_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
    ValueError, TypeError, AttributeError, KeyError, ImportError, NotImplementedError,
    AssertionError,
)
# OSError errnos that are permanent as well (s3fs maps S3 error codes onto errnos:
# InvalidArgument -> EINVAL, EntityTooLarge -> EMSGSIZE, wrong region -> EREMCHG, ...).
_PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOENT", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "EEXIST", "EINVAL", "ENAMETOOLONG",
        "EROFS", "ENOSYS", "EMSGSIZE", "EREMCHG", "ELOOP", "EILSEQ",
    ) if hasattr(errno, name)
)
# S3 error codes that mean "slow down / try again".
_TRANSIENT_S3_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestLimitExceeded",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "Busy", "OperationAborted",
})


def _botocore_verdict(exc: BaseException) -> bool | None:
    """True/False for botocore exceptions (transient?), None for anything else."""
    bx = sys.modules.get("botocore.exceptions")
    if bx is None:  # botocore not loaded: exc cannot be one of its exceptions
        return None
    if isinstance(exc, bx.ClientError):
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_S3_CODES or status == 429 or int(status) >= 500
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError):
        return True
    if isinstance(exc, bx.BotoCoreError):
        # Credentials, parameter validation, configuration: retrying cannot help.
        return False
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` might succeed.

    Permanent: missing objects, denied access, wrong arguments, programming errors.
    Transient: everything else a network stack raises (OSError, timeouts, connection
    errors, aiohttp client errors, S3 throttling and 5xx) - the failure modes of remote
    stores are open-ended, so unknown errors get the benefit of the doubt.
    """
    verdict = _botocore_verdict(exc)
    if verdict is not None:
        return verdict
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    return True


# ---------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------

_SENSITIVE_NAME = re.compile(r"key|secret|token|passw|credential|auth|signature|sas|cert",
                             re.IGNORECASE)
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` shown as ``***@``."""
    return _URL_USERINFO.sub(r"\1***@", url)


def _secret_strings(options: Any, sensitive: bool = False) -> set[str]:
    """String values in ``options`` held under a sensitive-looking name (at any depth)."""
    found: set[str] = set()
    if isinstance(options, dict):
        for name, value in options.items():
            found |= _secret_strings(value, sensitive or bool(_SENSITIVE_NAME.search(str(name))))
    elif isinstance(options, list | tuple | set):
        for value in options:
            found |= _secret_strings(value, sensitive)
    elif sensitive and isinstance(options, str) and len(options) >= 4:
        found.add(options)
    return found


# ---------------------------------------------------------------------------------------------


def _atomic_write_local(path: str, data: bytes) -> None:
    """Write ``data`` to the local ``path`` atomically and durably (codec.files: a
    fixed-length temp name beside the target, fsync, ``os.replace``, directory fsync)."""
    atomic_write(path, data)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    """Validate a key: relative, '/'-separated, no '.'/'..' segments (no escaping the root).

    A trailing '/' is dropped ("parts/" names the prefix "parts")."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if key.startswith("/") or "\\" in key or "://" in key:
        raise ValueError(f"key must be relative to the storage root: {key!r}")
    key = key.rstrip("/")
    if not key:
        if allow_empty:
            return ""
        raise ValueError("empty key")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"key has an empty, '.' or '..' segment: {key!r}")
    return key


class Storage:
    """A root URL (file://, s3://, memory://, gs://, bare local path) plus fsspec options.

    Keys are paths relative to the root. Every operation either succeeds or raises
    :class:`StorageError` (:class:`StorageNotFound` for missing objects); transient
    failures are retried ``retries`` times with exponential backoff (``backoff`` seconds,
    doubling, capped at ``max_backoff``, with jitter). ``sleep`` is the pause function, a
    seam for tests; it does not survive pickling (the copy uses ``time.sleep``).
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, retries: int = 4,
                 backoff: float = 0.2, max_backoff: float = 5.0,
                 sleep: Callable[[float], None] | None = None) -> None:
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0")
        url = os.fspath(url)
        if "::" in url:
            raise ValueError("chained fsspec URLs (a::b) are not supported as storage roots")
        protocol, path = split_protocol(url)
        if protocol is None or protocol == "local":
            protocol = "file"
            if "://" not in url:  # bare path: relative to the working directory
                path = os.path.abspath(os.path.expanduser(path))
        cls = fsspec.get_filesystem_class(protocol)
        canonical = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
        self.protocol: str = canonical
        self.storage_options: dict = dict(storage_options or {})
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep or time.sleep
        root = cls._strip_protocol(url if protocol != "file" or "://" in url else path)
        if root != "/" and root.endswith("/"):
            root = root.rstrip("/")
        if not root:
            raise ValueError(f"storage root {url!r} names no bucket or directory")
        self._root: str = root
        self._prefix = root if root.endswith("/") else root + "/"
        self.url: str = self._unstrip(root)
        self._fs: Any = None
        self._lock = threading.Lock()
        self._secrets = _secret_strings(self.storage_options)

    # -- construction, pickling -----------------------------------------------------------

    def _unstrip(self, path: str) -> str:
        return f"{self.protocol}://{path}"  # local and memory paths start with '/'

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, built on first use in each process."""
        if self._fs is None:
            with self._lock:
                if self._fs is None:
                    options = dict(self.storage_options)
                    # Listings must see objects written since the last listing.
                    options.setdefault("use_listings_cache", False)
                    self._fs = fsspec.filesystem(self.protocol, **options)
        return self._fs

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_fs", "_lock", "_sleep"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fs = None
        self._lock = threading.Lock()
        self._sleep = time.sleep

    def __repr__(self) -> str:
        # Option names only: their values may be credentials.
        return (f"Storage({self._redact(self.url)!r}, "
                f"options=[{', '.join(sorted(map(str, self.storage_options)))}])")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Storage) and self.url == other.url
                and self.storage_options == other.storage_options)

    def __hash__(self) -> int:
        return hash(self.url)

    def child(self, *parts: str) -> Storage:
        """A Storage rooted at a sub-prefix (e.g. ``out.child("parts")``), same options."""
        key = _check_key("/".join(p.strip("/") for p in parts if p.strip("/")), allow_empty=True)
        new = object.__new__(Storage)
        new.__dict__.update(self.__dict__)  # shares options, filesystem and sleep hook
        new._lock = threading.Lock()
        new._root = self.full_path(key)
        new._prefix = new._root if new._root.endswith("/") else new._root + "/"
        new.url = new._unstrip(new._root)
        return new

    # -- paths -------------------------------------------------------------------------------

    def full_path(self, key: str) -> str:
        """The path fsspec sees for ``key`` (e.g. ``bucket/prefix/key``)."""
        key = _check_key(key, allow_empty=True)
        return self._root if not key else self._prefix + key

    def url_of(self, key: str) -> str:
        """A URL for ``key`` that a user (or another Storage) can pass back."""
        return self._unstrip(self.full_path(key))

    def key_of(self, url_or_path: str) -> str:
        """The key of a URL or fsspec path under this root; ValueError if outside it."""
        protocol, _ = split_protocol(url_or_path)
        if protocol is not None:
            if protocol == "local":
                protocol = "file"
            cls = fsspec.get_filesystem_class(protocol)
            names = (cls.protocol,) if isinstance(cls.protocol, str) else cls.protocol
            path = cls._strip_protocol(url_or_path) if self.protocol in names else ""
        else:
            path = url_or_path
        path = path.rstrip("/") if path != "/" else path
        if not path.startswith(self._prefix):
            raise ValueError(f"{self._redact(url_or_path)} is not under {self._redact(self.url)}")
        return _check_key(path[len(self._prefix):])

    def _redact(self, text: str) -> str:
        text = redact_url(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- retry machinery ---------------------------------------------------------------------

    def _call(self, op: str, target: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient failures; raise StorageError with a clean message."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                transient = is_transient(exc)
                if transient and attempt < attempts:
                    delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                    self._sleep(delay * random.uniform(0.5, 1.0))
                    continue
                reason = self._redact(f"{type(exc).__name__}: {exc}")
                where = self._redact(target)
                if not transient:
                    cls = StorageNotFound if isinstance(exc, FileNotFoundError) else StorageError
                    message = f"{op} {where} failed: {reason}"
                else:
                    cls = StorageError
                    message = f"{op} {where} failed after {attempt} attempts: {reason}"
                raise cls(message, op=op, target=where, attempts=attempt,
                          transient=transient) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- listing -----------------------------------------------------------------------------

    def _find(self, path: str, recursive: bool) -> list[tuple[str, dict]]:
        """(key, fsspec info) for files under ``path``; fresh, temp files/markers skipped."""

        def run() -> dict:
            fs = self.fs
            fs.invalidate_cache(path)
            return fs.find(path, maxdepth=None if recursive else 1, withdirs=False, detail=True)

        found = self._call("list", self._unstrip(path), run)
        entries = []
        for name, info in found.items():
            if info.get("type", "file") != "file" or name.endswith("/"):
                continue  # directories and S3 "directory marker" objects ("prefix/")
            if not name.startswith(self._prefix):
                continue
            key = name[len(self._prefix):]
            if not key or is_temp_name(key.rsplit("/", 1)[-1]):
                continue
            entries.append((key, info))
        entries.sort(key=lambda entry: entry[0])
        return entries

    def _object_info(self, key: str, info: dict) -> ObjectInfo:
        version = info.get("ETag") or info.get("etag") or ""
        if version:
            version = str(version).strip('"')
        elif info.get("mtime") is not None:
            version = str(info["mtime"])
        return ObjectInfo(key=key, size=int(info.get("size") or 0), version=version)

    def list_images(self, extensions: Iterable[str] = IMAGE_EXTENSIONS,
                    recursive: bool = True) -> list[ObjectInfo]:
        """Image files under the root, sorted by key (deterministic shards).

        Extensions match case-insensitively (``IMG_1.JPG``). Hidden files and folders
        (a segment starting with '.') are skipped: in a photo archive they are junk - macOS
        ``._IMG.jpg`` resource forks, NAS thumbnail folders, our own temp files. A root that
        does not exist lists as empty (object stores cannot tell it from an empty prefix);
        a missing bucket raises StorageNotFound. :meth:`iter_images` is the same listing
        streamed, for archives too large to hold.
        """
        return sorted(self.iter_images(extensions, recursive), key=lambda o: o.key)

    def iter_images(self, extensions: Iterable[str] = IMAGE_EXTENSIONS,
                    recursive: bool = True) -> Iterator[ObjectInfo]:
        """:meth:`list_images` as a stream, in no particular order: locally a walk of the
        directories, on object stores one paginated listing per prefix, the prefixes listed
        in parallel threads; memory holds a few prefixes' pages, never the archive."""
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

        def wanted(key: str) -> bool:
            return is_image_key(key, exts)

        if self.protocol == "file":
            for key, st in self._walk_local(self._root, recursive):
                if wanted(key):
                    yield ObjectInfo(key, st.st_size, str(st.st_mtime))
            return
        for key, info in self._walk_remote(recursive):
            if wanted(key):
                yield self._object_info(key, info)

    def _walk_local(self, top: str, recursive: bool) -> Iterator[tuple[str, os.stat_result]]:
        """(key, stat) of the files under ``top``, directory by directory (os.scandir)."""
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"list {self._redact(folder)} failed: {exc}", op="list",
                                   target=self._redact(folder)) from exc
            for entry in entries:  # symlinks are not followed (as fsspec's listing)
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and not is_temp_name(entry.name):
                    yield entry.path[len(self._prefix):], entry.stat(follow_symlinks=False)

    def _walk_remote(self, recursive: bool) -> Iterator[tuple[str, dict]]:
        """(key, fsspec info) of the objects under the root: the root's first level, then
        each sub-prefix walked in its own thread (fsspec's walk: one paginated listing per
        prefix), results handed over as each prefix's pages arrive."""
        try:
            first = self._call("list", self.url, lambda: self.fs.ls(self._root, detail=True))
        except StorageNotFound:  # no such prefix (empty) or no such bucket (raises)
            yield from self._find(self._root, recursive)
            return
        folders = []
        for info in first:
            name = info["name"].rstrip("/")
            if info.get("type") == "directory":
                folders.append(name)
            elif name.startswith(self._prefix) and not is_temp_name(name.rsplit("/", 1)[-1]):
                yield name[len(self._prefix):], info
        if not recursive or not folders:
            return

        def walk(folder: str) -> list[tuple[str, dict]]:
            def run() -> list[tuple[str, dict]]:
                found = []
                for _, _, files in self.fs.walk(folder, detail=True):
                    for name, info in files.items():
                        path = info.get("name", name).rstrip("/")
                        if (info.get("type", "file") == "file" and path.startswith(self._prefix)
                                and not is_temp_name(path.rsplit("/", 1)[-1])):
                            found.append((path[len(self._prefix):], info))
                return found
            return self._call("list", self._unstrip(folder), run)

        with ThreadPoolExecutor(max_workers=_MANIFEST_WORKERS) as pool:
            for found in pool.map(walk, folders):
                yield from found

    def list_keys(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Keys (relative to the root, sorted) of all files under the sub-prefix ``prefix``
        whose names end with ``suffix``; temp files of unfinished writes are skipped."""
        path = self.full_path(prefix)
        if self.protocol == "file":
            return sorted(key for key, _ in self._walk_local(path, True) if key.endswith(suffix))
        return [key for key, _ in self._find(path, True) if key.endswith(suffix)]

    def list_manifest(self, manifest_url_or_key: str) -> list[ObjectInfo]:
        """Objects named by a manifest (see :meth:`iter_manifest`), unique, sorted by key."""
        unique = {info.key: info for info in self.iter_manifest(manifest_url_or_key)}
        return [unique[key] for key in sorted(unique)]

    def iter_manifest(self, manifest_url_or_key: str) -> Iterator[ObjectInfo]:
        """Objects named by a manifest, streamed in batches. Three kinds:

        * an **S3 Inventory report**, its ``manifest.json`` (AWS writes one per report for
          buckets too large to list): the CSV (gzip) or Parquet data files it names are read
          in turn, with the size and ETag they hold; the objects under this root are kept;
        * a **Parquet key list** (``.parquet``): a ``key`` column, and ``size`` and
          ``version`` columns or else a lookup per key;
        * a **text file**, one key per line: a key relative to the root, or a full URL (or,
          for local roots, an absolute path) under the root; blank lines and lines starting
          with '#' are ignored; each object is looked up (in parallel) for its size and
          version.

        The manifest itself is a key under the root or a URL anywhere (same options when
        the protocol matches). A line outside the root raises StorageError; missing objects
        raise StorageNotFound naming up to 5 of them, after the whole manifest was read (a
        manifest is an explicit promise, so a gap is an error, not a silent skip).
        """
        where = self._redact(str(manifest_url_or_key))
        name = manifest_url_or_key.rstrip("/").rsplit("/", 1)[-1]
        if name == "manifest.json":
            from pipeline.inventory import inventory_objects

            yield from inventory_objects(self, manifest_url_or_key)
            return
        missing: list[str] = []
        if name.endswith(".parquet"):
            batches = self._parquet_keys(manifest_url_or_key)
        else:
            batches = self._text_keys(manifest_url_or_key, where)
        for keys, known in batches:
            if known is not None:
                yield from known
                continue
            for key, info in zip(keys, self._lookup(keys), strict=True):
                if info is None:
                    missing.append(key)
                else:
                    yield info
        if missing:
            shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)"
                                              if len(missing) > 5 else "")
            raise StorageNotFound(f"manifest {where}: {len(missing)} missing object(s) under "
                                  f"{self._redact(self.url)}: {shown}",
                                  op="manifest", target=where)

    def _lookup(self, keys: list[str]) -> list[ObjectInfo | None]:
        def one(key: str) -> ObjectInfo | None:
            try:
                return self.info(key)
            except StorageNotFound:
                return None

        with ThreadPoolExecutor(max_workers=min(_MANIFEST_WORKERS, max(1, len(keys)))) as pool:
            return list(pool.map(one, keys))

    def _manifest_key(self, line: str) -> str:
        if "://" in line or (self.protocol == "file" and line.startswith("/")):
            return self.key_of(line)
        return _check_key(line[2:] if line.startswith("./") else line)

    def _text_keys(self, manifest: str, where: str
                   ) -> Iterator[tuple[list[str], list[ObjectInfo] | None]]:
        text = self._read_manifest(manifest).decode("utf-8-sig")
        keys: list[str] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                keys.append(self._manifest_key(line))
            except (TypeError, ValueError, ImportError) as exc:
                raise StorageError(f"manifest {where} line {lineno}: {self._redact(str(exc))}",
                                   op="manifest", target=where) from exc
            if len(keys) >= _MANIFEST_BATCH:
                yield keys, None
                keys = []
        yield keys, None

    def _parquet_keys(self, manifest: str
                      ) -> Iterator[tuple[list[str], list[ObjectInfo] | None]]:
        import io

        import pyarrow.parquet as pq

        data = pq.ParquetFile(io.BytesIO(self._read_manifest(manifest)))
        names = set(data.schema_arrow.names)
        if "key" not in names:
            raise StorageError(f"manifest {self._redact(manifest)}: a Parquet key list needs a "
                               f"'key' column (it has {', '.join(sorted(names))})",
                               op="manifest", target=self._redact(manifest))
        known = {"size", "version"} <= names
        columns = ["key", "size", "version"] if known else ["key"]
        for batch in data.iter_batches(batch_size=_MANIFEST_BATCH, columns=columns):
            keys = [self._manifest_key(k) for k in batch.column("key").to_pylist()]
            if known:
                yield keys, [ObjectInfo(k, int(s), v or "") for k, s, v in zip(
                    keys, batch.column("size").to_pylist(), batch.column("version").to_pylist(),
                    strict=True)]
            else:
                yield keys, None

    def _read_manifest(self, manifest_url_or_key: str) -> bytes:
        if "://" not in manifest_url_or_key:
            return self.read_bytes(manifest_url_or_key)
        try:
            return self.read_bytes(self.key_of(manifest_url_or_key))
        except ValueError:
            pass
        parent, _, name = manifest_url_or_key.rstrip("/").rpartition("/")
        protocol, _ = split_protocol(manifest_url_or_key)
        same = protocol == self.protocol or (protocol == "local" and self.protocol == "file")
        other = Storage(parent, self.storage_options if same else None, retries=self.retries,
                        backoff=self.backoff, max_backoff=self.max_backoff, sleep=self._sleep)
        return other.read_bytes(name)

    # -- objects -----------------------------------------------------------------------------

    def info(self, key: str) -> ObjectInfo:
        """Size and version of one object; StorageNotFound if absent, StorageError if a
        directory."""
        path = self.full_path(key)

        def run() -> dict:
            info = self.fs.info(path)
            if info.get("type", "file") != "file":
                raise IsADirectoryError(f"not an object: {path}")
            return info

        return self._object_info(_check_key(key), self._call("info", self._unstrip(path), run))

    def exists(self, key: str) -> bool:
        """Whether an object (a file, not a directory) exists at ``key``.

        Unlike ``fs.exists``, network errors raise instead of reading as "absent": a job
        must not conclude that a part is missing because the store was unreachable.
        """
        try:
            self.info(key)
        except StorageNotFound:
            return False
        except StorageError as exc:
            if isinstance(exc.__cause__, IsADirectoryError):
                return False
            raise
        return True

    def read_bytes(self, key: str) -> bytes:
        """The whole object, retried on transient failures."""
        path = self.full_path(_check_key(key))
        return self._call("read", self._unstrip(path), lambda: self.fs.cat_file(path))

    def write_atomic(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` so that readers see the old object or the new one,
        never a partial one: temp file + fsync + rename locally, one PUT (``pipe_file``)
        elsewhere - atomic on object stores (s3, gs, memory), best effort on others.
        Parent directories are created as needed."""
        path = self.full_path(_check_key(key))
        data = bytes(data)
        if self.protocol == "file":
            # codec.files: a fixed-length temp name beside the target, fsync, os.replace
            run: Callable[[], None] = lambda: atomic_write(path, data)  # noqa: E731
        else:
            run = lambda: self.fs.pipe_file(path, data)  # noqa: E731
        self._call("write", self._unstrip(path), run)

    def delete(self, key: str) -> None:
        """Remove the object at ``key``; a missing object is fine (idempotent cleanup)."""
        path = self.full_path(_check_key(key))

        def run() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

        self._call("delete", self._unstrip(path), run)


def read_url(url: str | os.PathLike[str], storage_options: dict | None = None) -> bytes:
    """The bytes of one object at any fsspec URL or local path, read with retries.

    A Storage rooted at the URL's parent does the reading, so one file (``sgarc decode
    s3://bucket/archive/bitstreams/x.jpg.sga``) gets the same retries and secret-free
    errors as a job. Raises :class:`StorageNotFound`, :class:`StorageError`, or ValueError
    (a URL that names no file, an unknown protocol)."""
    url = os.fspath(url)
    protocol, path = split_protocol(url)
    head, sep, name = path.rpartition("/")
    if not name:
        raise ValueError(redact_url(url) + " names no file")
    if not sep:
        head = "" if protocol else "."
    elif not head:
        head = "/"
    return Storage(f"{protocol}://{head}" if protocol else head, storage_options).read_bytes(name)
