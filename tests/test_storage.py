"""pipeline.storage against real backends: local directories, memory://, and S3 (moto server).

No mocks: transient failures are real connection failures (a closed port), healing is a
server that starts between two attempts, listings go through s3fs against real HTTP.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator

import fsspec
import pytest

from pipeline.storage import (
    IMAGE_EXTENSIONS,
    ObjectInfo,
    Storage,
    StorageError,
    StorageNotFound,
    is_transient,
)
from tests import s3server
from tests.s3server import S3Server, free_port, start_s3_server, storage_options_for

BACKENDS = ["path", "file_url", "memory", "s3"]

# botocore would retry a refused connection itself for ~10 s; the failure tests count
# Storage's own attempts, so the SDK makes one try per call.
ONE_SDK_TRY = {"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}


class Sleeps:
    """An injected sleep: records the delays, optionally runs a hook, never sleeps."""

    def __init__(self, hook: Callable[[int], None] | None = None) -> None:
        self.delays: list[float] = []
        self.hook = hook

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.hook is not None:
            self.hook(len(self.delays))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, for the whole session."""
    with s3server.s3_server() as server:
        yield server


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path, sleeps) -> Iterator[Storage]:
    """The same Storage contract on every backend (retries with a recording sleep)."""
    kind = request.param
    options: dict = {}
    if kind == "path":
        url = str(tmp_path / "root")
    elif kind == "file_url":
        url = f"file://{tmp_path}/root"
    elif kind == "memory":
        url = f"memory://test-{uuid.uuid4().hex[:12]}/root"
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        url = f"s3://{server.create_bucket()}/root"
        options = server.storage_options()
    storage = Storage(url, options, retries=2, backoff=0.01, sleep=sleeps)
    yield storage
    if kind == "memory":
        memory = fsspec.filesystem("memory")
        top = storage.full_path("").rsplit("/", 1)[0]
        if memory.exists(top):
            memory.rm(top, recursive=True)


def put_raw(storage: Storage, key: str, data: bytes) -> None:
    """Create an object bypassing write_atomic (for temp files, markers, leftovers)."""
    path = storage.full_path(key) + ("/" if key.endswith("/") else "")
    if storage.protocol == "file":
        if key.endswith("/"):
            os.makedirs(path, exist_ok=True)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    elif storage.protocol == "memory" and key.endswith("/"):
        storage.fs.mkdir(path.rstrip("/"))
    else:
        storage.fs.pipe_file(path, data)  # on S3 "sub/" is a zero-length directory marker


# ---------------------------------------------------------------------------------------------
# The contract on every backend
# ---------------------------------------------------------------------------------------------


def test_list_images_filters_sorts_recurses_and_skips_junk(store: Storage,
                                                            sleeps: Sleeps) -> None:
    files = {
        "b.JPG": b"bb", "a.png": b"a", "sub/c.jpeg": b"ccc", "sub/deep/d.WebP": b"dddd",
        "notes.txt": b"n", "a.png.json": b"{}", "Z.TIFF": b"zz",
    }
    for key, data in files.items():
        store.write_atomic(key, data)
    put_raw(store, ".a.png.0123abcd.tmp", b"half")  # leftover of a crashed write
    put_raw(store, "sub/._c.jpeg", b"x")  # macOS resource fork
    put_raw(store, ".thumbs/t.jpg", b"x")  # hidden folder
    put_raw(store, "empty/", b"")  # empty directory / S3 directory marker
    put_raw(store, "sub/", b"")

    images = store.list_images()
    assert [i.key for i in images] == ["Z.TIFF", "a.png", "b.JPG", "sub/c.jpeg",
                                       "sub/deep/d.WebP"]
    assert {i.key: i.size for i in images} == {i.key: len(files[i.key]) for i in images}
    assert all(isinstance(i, ObjectInfo) and not i.key.startswith("/") for i in images)
    assert [i.key for i in store.list_images(recursive=False)] == ["Z.TIFF", "a.png", "b.JPG"]
    assert [i.key for i in store.list_images(extensions=(".png", "JPEG"))] == [
        "a.png", "sub/c.jpeg"]
    assert [i.key for i in store.child("sub").list_images()] == ["c.jpeg", "deep/d.WebP"]
    assert store.list_keys("sub") == ["sub/._c.jpeg", "sub/c.jpeg", "sub/deep/d.WebP"]
    assert sleeps.delays == []


def test_listings_see_new_and_deleted_objects(store: Storage) -> None:
    """A resumable job asks "which parts exist?" after writing: no stale listing cache."""
    assert store.list_keys("parts", suffix=".parquet") == []  # prefix does not exist yet
    assert store.list_images() == []
    store.write_atomic("parts/shard-00001.parquet", b"p1")
    assert store.list_keys("parts", suffix=".parquet") == ["parts/shard-00001.parquet"]
    store.write_atomic("parts/shard-00000.parquet", b"p0")
    store.write_atomic("parts/notes.txt", b"n")
    put_raw(store, "parts/.shard-00002.parquet.5f5f5f5f.tmp", b"half")
    assert store.list_keys("parts/", suffix=".parquet") == [
        "parts/shard-00000.parquet", "parts/shard-00001.parquet"]
    assert store.list_keys() == ["parts/notes.txt", "parts/shard-00000.parquet",
                                 "parts/shard-00001.parquet"]
    store.delete("parts/shard-00001.parquet")
    assert store.list_keys("parts", ".parquet") == ["parts/shard-00000.parquet"]
    assert store.child("parts").list_keys() == ["notes.txt", "shard-00000.parquet"]


def test_write_read_overwrite_exists_delete(store: Storage, sleeps: Sleeps) -> None:
    assert not store.exists("out/x.sga")
    store.write_atomic("out/x.sga", b"first")
    assert store.exists("out/x.sga")
    assert not store.exists("out")  # a prefix is not an object
    assert store.read_bytes("out/x.sga") == b"first"
    store.write_atomic("out/x.sga", b"second, longer")
    assert store.read_bytes("out/x.sga") == b"second, longer"
    assert store.info("out/x.sga").size == len(b"second, longer")
    store.delete("out/x.sga")
    store.delete("out/x.sga")  # missing is fine
    assert not store.exists("out/x.sga")
    assert sleeps.delays == []


def test_missing_object_is_not_retried(store: Storage, sleeps: Sleeps) -> None:
    with pytest.raises(StorageNotFound) as caught:
        store.read_bytes("nope/missing.png")
    err = caught.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, StorageError)
    assert err.missing and err.attempts == 1 and not err.transient
    assert isinstance(err.__cause__, FileNotFoundError)
    assert "read" in str(err) and store.url_of("nope/missing.png") in str(err)
    clone = pickle.loads(pickle.dumps(err))  # errors cross process boundaries (Ray)
    assert isinstance(clone, StorageNotFound) and clone.attempts == 1 and str(clone) == str(err)
    with pytest.raises(StorageNotFound):
        store.info("nope/missing.png")
    assert sleeps.delays == []


def test_info_version(store: Storage) -> None:
    data = b"version me"
    store.write_atomic("v.png", data)
    info = store.info("v.png")
    assert info == ObjectInfo("v.png", len(data), info.version)
    assert store.list_images() == [info]
    if store.protocol == "s3":
        assert info.version == hashlib.md5(data).hexdigest()  # the ETag of a single PUT
    elif store.protocol == "file":
        assert float(info.version) == os.stat(store.full_path("v.png")).st_mtime
    else:
        assert info.version == ""


def test_manifest(store: Storage) -> None:
    for key in ("a.jpg", "sub/b.png", "sub/c.png"):
        store.write_atomic(key, key.encode())
    manifest = "\n".join([
        "# chosen photos", "", "sub/c.png", f"  {store.url_of('a.jpg')}  ", "./sub/b.png",
        "sub/c.png", "   # indented comment",
    ])
    store.write_atomic("lists/m.txt", manifest.encode())
    expected = [store.info(k) for k in ("a.jpg", "sub/b.png", "sub/c.png")]
    assert store.list_manifest("lists/m.txt") == expected
    assert store.list_manifest(store.url_of("lists/m.txt")) == expected  # manifest by URL
    # A manifest outside the root (read with the same options), naming objects inside it.
    store.write_atomic("lists/sub.txt", f"b.png\n{store.url_of('sub/c.png')}\n".encode())
    sub = store.child("sub")
    assert sub.list_manifest(store.url_of("lists/sub.txt")) == [
        ObjectInfo("b.png", 9, expected[1].version), ObjectInfo("c.png", 9, expected[2].version)]


def test_manifest_outside_root_and_missing(store: Storage, sleeps: Sleeps) -> None:
    store.write_atomic("a.jpg", b"a")
    for bad in ("../escape.jpg", store.url_of("").rsplit("/", 1)[0] + "/other/x.jpg"):
        store.write_atomic("m.txt", f"a.jpg\n{bad}\n".encode())
        with pytest.raises(StorageError, match="line 2") as caught:
            store.list_manifest("m.txt")
        assert not caught.value.missing
    missing = [f"gone/{i}.jpg" for i in range(7)]
    store.write_atomic("m.txt", "\n".join(["a.jpg", *missing]).encode())
    with pytest.raises(StorageNotFound, match="7 missing") as caught:
        store.list_manifest("m.txt")
    message = str(caught.value)
    assert all(key in message for key in missing[:5]) and missing[6] not in message
    assert "and 2 more" in message
    assert sleeps.delays == []


def test_pickle_round_trip(store: Storage) -> None:
    store.write_atomic("p/x.png", b"pickled")
    assert store.fs is not None  # built
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fs is None  # rebuilt lazily in the receiving process
    assert clone == store and clone.url == store.url and clone.protocol == store.protocol
    assert clone.read_bytes("p/x.png") == b"pickled"
    assert [i.key for i in clone.list_images()] == ["p/x.png"]


def test_urls_round_trip(store: Storage) -> None:
    url = store.url_of("sub/a.png")
    assert url.startswith(f"{store.protocol}://")
    again = Storage(url.rsplit("/", 2)[0], store.storage_options)
    assert again.url == store.url
    assert again.key_of(url) == "sub/a.png"
    assert store.child("sub").url_of("a.png") == url
    assert store.full_path("sub/a.png").endswith("root/sub/a.png")
    for bad in ("/abs.png", "../up.png", "a//b.png", "a/./b.png", ""):
        with pytest.raises(ValueError):
            store.read_bytes(bad)


# ---------------------------------------------------------------------------------------------
# Local filesystem: atomicity
# ---------------------------------------------------------------------------------------------


def test_local_roots_normalize(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bare = Storage("photos/")
    assert bare.url == f"file://{tmp_path}/photos" and bare.protocol == "file"
    assert bare == Storage(f"file://{tmp_path}/photos") == Storage(str(tmp_path / "photos"))
    assert bare.full_path("x.jpg") == f"{tmp_path}/photos/x.jpg"


def test_local_atomic_write_leaves_no_temp_files_and_normal_permissions(tmp_path) -> None:
    store = Storage(tmp_path / "out")
    for i in range(3):
        store.write_atomic("deep/er/x.sga", bytes([i]) * 10)
    assert os.listdir(tmp_path / "out/deep/er") == ["x.sga"]
    assert (tmp_path / "out/deep/er/x.sga").read_bytes() == bytes([2]) * 10
    (tmp_path / "plain").write_bytes(b"")
    assert os.stat(tmp_path / "out/deep/er/x.sga").st_mode == os.stat(tmp_path / "plain").st_mode


def test_longest_names_write_read_and_list(store: Storage) -> None:
    """A 255-byte name (NAME_MAX locally): the temp name of an atomic write must not
    lengthen it (it used to add ~22 bytes: ENAMETOOLONG from 234 bytes on)."""
    names = ["n" * 251 + ".jpg", "é" * 125 + "a.png"]  # 255 bytes each (UTF-8)
    assert [len(n.encode()) for n in names] == [255, 255]
    for i, name in enumerate(names):
        store.write_atomic(f"deep/{name}", bytes([i]) * 10)
        store.write_atomic(f"deep/{name}", bytes([i + 1]) * 10)  # and replaced
    assert [o.key for o in store.list_images()] == sorted(f"deep/{n}" for n in names)
    for i, name in enumerate(names):
        assert store.read_bytes(f"deep/{name}") == bytes([i + 1]) * 10
    if store.protocol == "file":
        assert sorted(os.listdir(store.full_path("deep"))) == sorted(names)  # no temp left


def test_local_failed_write_is_permanent_and_leaves_nothing(tmp_path) -> None:
    sleeps = Sleeps()
    store = Storage(tmp_path, retries=3, sleep=sleeps)
    store.write_atomic("file", b"x")
    with pytest.raises(StorageError, match="write") as caught:
        store.write_atomic("file/child.sga", b"y")  # parent is a file
    assert isinstance(caught.value.__cause__, (NotADirectoryError, FileExistsError))
    assert sleeps.delays == [] and sorted(os.listdir(tmp_path)) == ["file"]


def test_local_reader_never_sees_partial_writes(tmp_path) -> None:
    """Readers racing a writer see the old or the new 1 MB payload, never a mix or a prefix."""
    store = Storage(tmp_path)
    size = 1 << 20
    store.write_atomic("blob.bin", b"a" * size)
    done = threading.Event()
    problems: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        reader_store = Storage(tmp_path)
        while not done.is_set():
            data = reader_store.read_bytes("blob.bin")
            reads += 1
            if len(data) != size or data != data[:1] * size:
                problems.append(f"read {len(data)} bytes, starts {data[:1]!r}")
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            store.write_atomic("blob.bin", (b"b" if i % 2 == 0 else b"a") * size)
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert reads > 0
    assert os.listdir(tmp_path) == ["blob.bin"]


# ---------------------------------------------------------------------------------------------
# Retries against real failures (S3 over loopback)
# ---------------------------------------------------------------------------------------------


def test_transient_failures_are_retried_then_reported() -> None:
    port = free_port()  # nothing listens: every attempt is a refused connection
    sleeps = Sleeps()
    store = Storage("s3://bucket/root",
                    storage_options_for(f"http://127.0.0.1:{port}", config_kwargs=ONE_SDK_TRY),
                    retries=3, backoff=0.05, max_backoff=0.15, sleep=sleeps)
    with pytest.raises(StorageError) as caught:
        store.read_bytes("k.png")
    err = caught.value
    assert not isinstance(err, StorageNotFound)
    assert str(err).startswith("read s3://bucket/root/k.png failed after 4 attempts: ")
    assert err.attempts == 4 and err.transient and err.__cause__ is not None
    assert len(sleeps.delays) == 3
    for attempt, delay in enumerate(sleeps.delays):
        cap = min(0.15, 0.05 * 2**attempt)
        assert cap / 2 <= delay <= cap  # exponential, capped, jittered
    sleeps.delays.clear()
    with pytest.raises(StorageError, match=r"^list s3://bucket/root failed after 4 attempts"):
        store.list_images()
    with pytest.raises(StorageError, match=r"^write .* after 4 attempts"):
        store.write_atomic("x.sga", b"x")
    with pytest.raises(StorageError):
        store.exists("x.sga")  # unreachable is not "absent"
    assert len(sleeps.delays) == 9


def test_transient_failure_heals() -> None:
    """The store is down on the first attempt and up on the second: the read succeeds."""
    port = free_port()
    bucket_name = f"healing-{uuid.uuid4().hex[:8]}"
    started: list[S3Server] = []

    def start_server(n_sleeps: int) -> None:
        if not started:
            server = start_s3_server(port=port)
            started.append(server)
            bucket = server.create_bucket(bucket_name)
            server.client().put_object(Bucket=bucket, Key="root/k.png", Body=b"healed")

    sleeps = Sleeps(hook=start_server)
    store = Storage(f"s3://{bucket_name}/root",
                    storage_options_for(f"http://127.0.0.1:{port}", config_kwargs=ONE_SDK_TRY),
                    retries=3, backoff=0.01, sleep=sleeps)
    try:
        assert store.read_bytes("k.png") == b"healed"
        assert len(sleeps.delays) == 1
    finally:
        for server in started:
            server.stop()


def test_missing_bucket_is_permanent(s3_server: S3Server) -> None:
    sleeps = Sleeps()
    store = Storage("s3://no-such-bucket-here/x", s3_server.storage_options(), sleep=sleeps)
    with pytest.raises(StorageNotFound):
        store.list_images()
    assert sleeps.delays == []


def test_secrets_stay_out_of_repr_and_errors(s3_server: S3Server) -> None:
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzz"
    key_id = "AKIAZZZZSECRETKEYID"
    token = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
    for endpoint, expected in ((f"http://127.0.0.1:{free_port()}", StorageError),
                               (s3_server.endpoint_url, StorageNotFound)):
        options = {"key": key_id, "secret": secret, "token": token,
                   "client_kwargs": {"endpoint_url": endpoint},
                   "config_kwargs": ONE_SDK_TRY}
        store = Storage("s3://bucket-x/root", options, retries=1, backoff=0.0)
        text = repr(store)
        assert "s3://bucket-x/root" in text and "secret" in text  # option names only
        with pytest.raises(expected) as caught:
            store.read_bytes(f"{secret}.png")  # even a secret echoed back by the store
        message = str(caught.value)
        for value in (secret, key_id, token):
            assert value not in text and value not in message
        assert "***" in message


def test_error_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("Whatever", 429))
    assert not is_transient(client_error("AccessDenied", 403))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert not is_transient(NoCredentialsError())
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError(5, "EIO"))
    for permanent in (FileNotFoundError(), PermissionError(), IsADirectoryError(),
                      NotADirectoryError(), ValueError(), OSError(22, "EINVAL")):
        assert not is_transient(permanent)


def test_image_extensions_are_lower_case_with_dot() -> None:
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
