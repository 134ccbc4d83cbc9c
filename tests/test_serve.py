"""Decode on demand (pipeline/decode_service.py, jobs/serve.py): the service, the Starlette app on
real uvicorn on loopback, S3, the CLI, Ray Serve.

The archive is built once per module: a few tiny images encoded with the shipped default
model (amortized, so it takes well under a second), written as ``bitstreams/<key>.sga``,
plus corrupt streams and a file outside ``bitstreams/`` that traversal would reach.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageCms

from codec.api import Codec, decode
from codec.images import DEFAULT_MAX_PIXELS, load_image
from codec.inference import InferenceConfig
from jobs import serve
from jobs.serve import make_app, make_server, negotiate
from pipeline import decode_service
from pipeline.decode_service import (
    BadKey,
    BadRequest,
    ByteLRU,
    DecodeService,
    NotFound,
    fetch_decode,
    validate_key,
)
from pipeline.keys import bitstream_key
from pipeline.storage import Storage, StorageError
from tests.conftest import smooth_image

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "red.png"
PHOTO = "2024/img 1.jpg"  # a space and a folder; JPEG with EXIF and an ICC profile
ODD = "Ferien/Strand ä #1 100%.png"  # non-ASCII, '#', '%'; RGBA
CORRUPT = "broken.jpg"  # a real stream with one byte flipped (checksum fails)
GARBAGE = "garbage.png"  # not a stream at all
SIZES = {PLAIN: (64, 48), PHOTO: (56, 40), ODD: (32, 32)}  # (width, height)
CAMERA = "sgarc test camera"


@functools.cache
def _icc() -> bytes:
    """An sRGB profile (made once: its header carries the creation time)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _sources(tmp: Path) -> dict[str, Path]:
    paths = {}
    for key, (w, h) in SIZES.items():
        path = tmp / "src" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = smooth_image(h, w, seed=len(key))
        if key == PHOTO:
            exif = Image.Exif()
            exif[0x010F] = CAMERA  # Make
            exif[0x0132] = "2024:05:06 07:08:09"  # DateTime
            Image.fromarray(rgb).save(path, "JPEG", quality=95, exif=exif.tobytes(),
                                      icc_profile=_icc())
        elif key == ODD:
            alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
            Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path, "PNG")
        else:
            Image.fromarray(rgb).save(path, "PNG")
        paths[key] = path
    return paths


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """{"root": archive dir, "streams": {key: .sga bytes}}."""
    tmp = tmp_path_factory.mktemp("archive")
    root = tmp / "archive"
    codec = Codec(device="cpu")
    streams = {}
    for key, path in _sources(tmp).items():
        result = codec.encode(load_image(path), InferenceConfig(method="amortized"))
        streams[key] = result.data
    good = bytearray(streams[PLAIN])
    good[len(good) // 2] ^= 0x55
    streams[CORRUPT] = bytes(good)
    streams[GARBAGE] = b"hello, not a stream"
    for key, data in streams.items():
        target = root / "bitstreams" / (key + ".sga")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "secret.sga").write_bytes(streams[PLAIN])  # outside bitstreams/
    (tmp / "outside.sga").write_bytes(streams[PLAIN])  # outside the archive
    return {"root": root, "streams": streams}


class CountingStorage(Storage):
    """Counts reads (a cache hit must not read storage)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    def read_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().read_bytes(key)


@contextlib.contextmanager
def serving(service: DecodeService):
    """uvicorn serving ``service`` on a free loopback port, in a thread; yields (host, port)."""
    server = make_server(service, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture(scope="module")
def server(archive):
    """The shared server: (host, port) and its service."""
    service = DecodeService(archive["root"])
    with serving(service) as address:
        yield address, service


def request(address, path: str, method: str = "GET", headers: dict | None = None,
            body: bytes | None = None):
    """(status, headers, body) of one request; ``path`` is sent as is (no normalization)."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def image_path(key: str, query: str = "") -> str:
    return "/images/" + quote(key) + (f"?{query}" if query else "")


def open_image(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a.jpg", PHOTO, ODD, "x/y/z.png", "%2e%2e", "..a", "a..",
                                 ".hidden/a.jpg", "a" * decode_service.MAX_KEY_BYTES])
def test_valid_keys(key):
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/",
                                 "..", ".", "a\\..\\b", "a\x00b", "a\nb", "a\x7fb",
                                 "é" * 501, "\udcff"])
def test_bad_keys(key):
    with pytest.raises(BadKey):
        validate_key(key)


@pytest.mark.parametrize(("accept", "fmt"), [
    (None, "png"), ("", "png"), ("*/*", "png"), ("image/webp", "webp"),
    ("image/jpeg", "jpeg"), ("image/jpeg;q=0.5, image/webp;q=0.9", "webp"),
    ("image/avif,image/webp,image/apng,image/*,*/*;q=0.8", "png"),  # a browser's <img>
    ("image/png;q=0, image/*", "webp"), ("text/html", "png"), ("image/webp;q=0.2, */*", "png"),
    ("image/webp;q=x, image/jpeg", "jpeg"),
])
def test_negotiate(accept, fmt):
    assert negotiate(accept) == fmt


def test_byte_lru_evicts_least_recent_and_expires():
    now = [0.0]
    lru = ByteLRU(100, ttl=10, max_item_bytes=50, clock=lambda: now[0])
    assert lru.put("a", "A", 40) and lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # a is now the most recent
    assert lru.put("c", "C", 40)  # over 100: b goes
    assert lru.get("b") is None and lru.get("a") == "A" and lru.get("c") == "C"
    assert not lru.put("big", "X", 51)  # over the item limit: not kept
    now[0] = 11  # everything is older than the TTL now, and gives its bytes back
    assert lru.get("a") is None and lru.stats()["entries"] == 0 and lru.stats()["bytes"] == 0
    assert ByteLRU(0).put("a", "A", 1) is False
    assert not ByteLRU(100).put("a", "A", 26)  # by default, an item gets a quarter at most


def test_default_max_pixels_matches_the_codec():
    assert decode_service.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS  # fetch_decode, as sgarc decode


def test_the_service_allows_fewer_pixels_than_the_cli(archive):
    assert decode_service.SERVE_MAX_PIXELS <= DEFAULT_MAX_PIXELS // 2
    assert DecodeService(archive["root"]).max_pixels == decode_service.SERVE_MAX_PIXELS
    import argparse

    parser = argparse.ArgumentParser(prog="sgarc")
    serve.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--archive", "x"])
    assert args.max_pixels == decode_service.SERVE_MAX_PIXELS
    assert args.decode_memory_mb * (1 << 20) == decode_service.DEFAULT_DECODE_BYTES
    assert args.queue_timeout == decode_service.DEFAULT_QUEUE_TIMEOUT
    for flag, value in (("--max-pixels", "0"), ("--decode-memory-mb", "0"),
                        ("--queue-timeout", "-1")):
        with pytest.raises(serve.SgarcError, match=flag):
            serve.cmd_serve(parser.parse_args(["serve", "--archive", "x", flag, value]))


def test_byte_budget_is_first_come_first_served():
    budget = decode_service.ByteBudget(100)
    assert budget.acquire(60) == 60
    assert budget.acquire(50, timeout=0.05) is None  # does not fit in time
    assert budget.acquire(40, timeout=0) == 40  # fits
    order: list[str] = []

    def take(name: str, size: int) -> None:
        got = budget.acquire(size, timeout=10)
        order.append(name)
        budget.release(got)

    big = threading.Thread(target=take, args=("big", 1000))  # clamped to 100: runs alone
    big.start()
    while budget.stats()["waiting"] < 1:
        time.sleep(0.005)
    small = threading.Thread(target=take, args=("small", 1))  # fits, but waits its turn
    small.start()
    while budget.stats()["waiting"] < 2:
        time.sleep(0.005)
    assert order == []
    budget.release(60)
    budget.release(40)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]
    stats = budget.stats()
    assert stats["in_flight_bytes"] == 0 and stats["peak_bytes"] == 100
    assert stats["refused"] == 1 and stats["waiting"] == 0
    with pytest.raises(ValueError):
        decode_service.ByteBudget(0)


def _pixels_needed(key: str) -> int:
    w, h = SIZES[key]
    return 64 * -(-w // 64) * 64 * -(-h // 64) * decode_service.DECODE_BYTES_PER_PIXEL


@pytest.fixture
def slow_decode(monkeypatch):
    """codec.api.decode, slowed down, counting the decodes running at once."""
    import codec.api

    real = codec.api.decode
    state = {"running": 0, "most": 0, "delay": 0.3}
    lock = threading.Lock()

    def decode_slowly(*args, **kwargs):
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        try:
            time.sleep(state["delay"])
            return real(*args, **kwargs)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(codec.api, "decode", decode_slowly)
    return state


def test_decoded_bytes_in_flight_are_bounded(archive, slow_decode):
    # Room for one of these images at a time: requests for different images queue.
    budget = _pixels_needed(PLAIN) + 10_000
    service = DecodeService(archive["root"], cache_bytes=0, max_decodes=4,
                            decode_bytes=budget, queue_timeout=30)
    asks = [(PLAIN, "png", False), (PHOTO, "webp", False), (ODD, "png", False),
            (PLAIN, "png", True)]  # four different decodes
    with serving(service) as address, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda a: request(address, image_path(a[0], f"format={a[1]}&strip={int(a[2])}")),
            asks))
    assert [status for status, _, _ in results] == [200] * 4
    assert slow_decode["most"] == 1 and service.decodes == 4
    stats = service.health()["decoding"]
    assert stats["peak_bytes"] <= budget and stats["in_flight_bytes"] == 0
    assert stats["max_pixels"] == decode_service.SERVE_MAX_PIXELS

    # With room for all of them (the default budget), they run together.
    service = DecodeService(archive["root"], cache_bytes=0, max_decodes=4)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda a: service.get(a[0], a[1], strip_metadata=a[2]), asks))
    assert slow_decode["most"] > 1


def test_no_room_in_time_is_503_busy(archive, slow_decode):
    slow_decode["delay"] = 1.5
    service = DecodeService(archive["root"], cache_bytes=0,
                            decode_bytes=_pixels_needed(PLAIN) + 10_000, queue_timeout=0.2)
    with serving(service) as address, ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, address, image_path(PLAIN))
        while slow_decode["running"] == 0:
            time.sleep(0.01)
        status, headers, body = request(address, image_path(PHOTO))
        assert status == 503 and headers["retry-after"]
        assert json.loads(body)["error"] == "busy"
        assert first.result()[0] == 200
    assert service.health()["decoding"]["refused"] == 1


def test_forged_image_size_is_refused_before_decoding(archive, tmp_path):
    """A real stream whose header claims 7000 x 7000 pixels (within the service's limit),
    CRC recomputed: the codec sees that its latent sections cannot hold such an image."""
    import dataclasses

    from codec.bitstream import pack, parse

    bs = parse(archive["streams"][PLAIN])
    bs.header = dataclasses.replace(bs.header, width=7000, height=7000)
    root = tmp_path / "forged"
    (root / "bitstreams").mkdir(parents=True)
    (root / "bitstreams" / "bomb.png.sga").write_bytes(pack(bs))
    service = DecodeService(root, cache_bytes=0)
    with serving(service) as address:
        t0 = time.perf_counter()
        status, _, body = request(address, image_path("bomb.png"))
        assert status == 422 and time.perf_counter() - t0 < 5
        assert "stream too short for the declared image" in json.loads(body)["message"]
        bs.header = dataclasses.replace(bs.header, width=8000, height=8000)  # 64 MP
        (root / "bitstreams" / "big.png.sga").write_bytes(pack(bs))
        status, _, body = request(address, image_path("big.png"))
        assert status == 422 and "exceeds the limit" in json.loads(body)["message"]
    assert service.decodes == 1  # the one over the pixel limit never reached the decoder


# ---------------------------------------------------------------------------------------------
# Over HTTP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [PLAIN, PHOTO, ODD])
def test_png_by_default(server, archive, key):
    address, _ = server
    status, headers, body = request(address, image_path(key))
    assert status == 200, body
    assert headers["content-type"] == "image/png"
    assert int(headers["content-length"]) == len(body)
    im = open_image(body)
    assert im.format == "PNG" and im.size == SIZES[key]
    assert im.mode == ("RGBA" if key == ODD else "RGB")
    expected = decode(archive["streams"][key]).to_pil()
    assert np.array_equal(np.asarray(im), np.asarray(expected))  # lossless, exact
    assert headers["etag"].startswith('W/"') and "max-age" in headers["cache-control"]
    assert headers["vary"] == "Accept" and headers["x-content-type-options"] == "nosniff"


def test_jpeg_and_webp_on_request(server):
    address, _ = server
    for key, query, headers, fmt, mime in [
        (PHOTO, "format=jpeg", {}, "JPEG", "image/jpeg"),
        (PHOTO, "format=jpg&quality=50", {}, "JPEG", "image/jpeg"),
        (PHOTO, "format=WebP", {}, "WEBP", "image/webp"),
        (PHOTO, "", {"Accept": "image/webp"}, "WEBP", "image/webp"),
        (PHOTO, "", {"Accept": "image/jpeg, image/png;q=0.5"}, "JPEG", "image/jpeg"),
        (PHOTO, "format=png", {"Accept": "image/jpeg"}, "PNG", "image/png"),  # query wins
        (ODD, "format=jpeg", {}, "JPEG", "image/jpeg"),  # alpha composited onto white
        (ODD, "format=webp", {}, "WEBP", "image/webp"),
    ]:
        status, got, body = request(address, image_path(key, query), headers=headers)
        assert status == 200, (key, query, body)
        assert got["content-type"] == mime
        im = open_image(body)
        assert im.format == fmt and im.size == SIZES[key]
    low = request(address, image_path(PHOTO, "format=jpeg&quality=5"))[2]
    high = request(address, image_path(PHOTO, "format=jpeg&quality=95"))[2]
    assert len(low) < len(high)
    assert open_image(request(address, image_path(ODD, "format=webp"))[2]).mode == "RGBA"


def test_metadata_restored_unless_stripped(server):
    address, _ = server
    for query in ("", "format=jpeg", "format=webp"):
        status, headers, body = request(address, image_path(PHOTO, query))
        assert status == 200
        im = open_image(body)
        assert im.info.get("icc_profile") == _icc(), query
        assert im.getexif().get(0x010F) == CAMERA, query
        assert "exif" in headers["x-sgarc-metadata"] and "icc" in headers["x-sgarc-metadata"]
        status, headers, body = request(address, image_path(PHOTO, query + "&strip=1"))
        assert status == 200
        im = open_image(body)
        assert not im.info.get("icc_profile") and not im.getexif(), query
        assert headers["x-sgarc-metadata"] == "metadata: stripped"


def test_not_found_is_404_json(server):
    address, _ = server
    for path in (image_path("nope.jpg"), image_path("2024"), image_path("2024/img 1.jpg.sga"),
                 "/images/%252e%252e%252fsecret"):  # double-encoded: decoded once, a literal
        status, headers, body = request(address, path)
        assert status == 404, (path, body)
        assert headers["content-type"].startswith("application/json")
        payload = json.loads(body)
        assert payload["error"] == "not_found" and payload["status"] == 404
    status, _, body = request(address, "/nowhere")
    assert status == 404 and json.loads(body)["error"] == "not_found"


@pytest.mark.parametrize("path", [
    "/images/../../etc/passwd",
    "/images/../secret",
    "/images/../../outside",
    "/images/%2e%2e%2fsecret",
    "/images/%2e%2e%2f%2e%2e%2foutside",
    "/images/2024/%2E%2E/%2E%2E/secret",
    "/images/..%2F..%2Fetc%2Fpasswd",
    "/images//etc/passwd",
    "/images/%2Fetc%2Fpasswd",
    "/images/a%00b.jpg",
    "/images/red.png%00",
    "/images/..%5csecret",
    "/images/2024\\img 1.jpg".replace(" ", "%20"),
    "/images/a%0Ab",
    "/images/%ff%fe",
    "/images/",
    "/images",
    "/images/" + "a" * (decode_service.MAX_KEY_BYTES + 1),
    "/images/2024/",
    "/images/./red.png",
])
def test_malformed_and_escaping_keys_are_400(server, path):
    address, _ = server
    status, _, body = request(address, path)
    assert status == 400, body
    payload = json.loads(body)
    assert payload["error"] == "bad_key" and payload["message"]


def test_raw_utf8_in_the_request_line(server):
    """A request line must be ASCII (RFC 9112): uvicorn's parser refuses the key's raw UTF-8
    bytes with a 400 (the http.server before took them); percent-encoded, it is the image."""
    import socket

    address, _ = server
    target = "/images/" + ODD.replace(" ", "%20").replace("#", "%23").replace("%.", "%25.")
    for sent, expected in ((target.encode("utf-8"), b"HTTP/1.1 400"),
                           (quote(ODD).encode("ascii"), b"HTTP/1.1 200")):
        with socket.create_connection(address, timeout=30) as sock:
            path = sent if sent.startswith(b"/") else b"/images/" + sent
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(expected), head
    assert open_image(body).size == SIZES[ODD]


def test_bad_parameters_are_400(server):
    address, _ = server
    for query in ("format=gif", "format=jpeg&quality=0", "format=webp&quality=101",
                  "format=jpeg&quality=high", "strip=maybe"):
        status, _, body = request(address, image_path(PLAIN, query))
        assert status == 400, query
        assert json.loads(body)["error"] == "bad_request"


def test_corrupt_stream_is_422(server):
    address, _ = server
    for key in (CORRUPT, GARBAGE):
        for query in ("", "strip=1"):
            status, _, body = request(address, image_path(key, query))
            assert status == 422, (key, body)
            payload = json.loads(body)
            assert payload["error"] == "corrupt_stream" and key in payload["message"]


def test_healthz(server):
    address, service = server
    status, headers, body = request(address, "/healthz")
    assert status == 200 and headers["content-type"].startswith("application/json")
    payload = json.loads(body)
    assert payload["status"] == "ok"
    assert payload["archive"] == service.archive and payload["archive"].startswith("file://")
    assert Codec(device="cpu").model_id in payload["models"]
    assert {"entries", "bytes", "hits", "misses", "decodes"} <= set(payload["cache"])
    status, headers, body = request(address, "/healthz", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_methods(server):
    address, _ = server
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, body = request(address, image_path(PLAIN), method, body=b"x=1")
        assert status == 405, method
        assert headers["allow"] == "GET, HEAD"
        assert json.loads(body)["error"] == "method_not_allowed"
    assert request(address, "/healthz", "POST")[0] == 405
    assert request(address, image_path(PLAIN), "BREW")[0] == 400  # the HTTP parser refuses
    status, headers, body = request(address, image_path(PLAIN), "HEAD")
    get = request(address, image_path(PLAIN))
    assert status == 200 and body == b""
    assert headers["content-length"] == str(len(get[2])) and headers["etag"] == get[1]["etag"]


def test_conditional_get(server):
    address, _ = server
    status, headers, _ = request(address, image_path(PHOTO, "format=webp"))
    assert status == 200
    status, h304, body = request(address, image_path(PHOTO, "format=webp"),
                                 headers={"If-None-Match": headers["etag"]})
    assert status == 304 and body == b"" and h304["etag"] == headers["etag"]
    other = request(address, image_path(PHOTO, "format=png"))[1]["etag"]
    assert other != headers["etag"]  # the ETag names the representation too
    assert request(address, image_path(PHOTO, "format=webp"),
                   headers={"If-None-Match": other})[0] == 200


def test_keep_alive_serves_several_requests(server):
    address, _ = server
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        for path in (image_path(PLAIN), "/healthz", image_path("missing"), image_path(PLAIN)):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (200, 404)
    finally:
        conn.close()


def test_cache_hit_does_not_read_storage(archive, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(archive["root"], root)
    storage = CountingStorage(str(root))
    service = DecodeService(storage)
    with serving(service) as address:
        first = request(address, image_path(PHOTO))
        assert first[0] == 200 and first[1]["x-cache"] == "miss"
        (root / "bitstreams" / (PHOTO + ".sga")).unlink()  # only the cache has it now
        second = request(address, image_path(PHOTO))
        assert second[0] == 200 and second[1]["x-cache"] == "hit" and second[2] == first[2]
        assert len(storage.reads) == 1
        cache = service.health()["cache"]
        assert (cache["hits"], cache["misses"], cache["entries"]) == (1, 1, 1)
        # another representation is another decode, and the stream is gone now
        assert request(address, image_path(PHOTO, "format=webp"))[0] == 404
        service.clear_cache()
        assert request(address, image_path(PHOTO))[0] == 404
    assert service.health()["cache"]["hits"] >= 1


def test_concurrent_requests(archive):
    storage = CountingStorage(str(archive["root"]))
    service = DecodeService(storage)
    with serving(service) as address, ThreadPoolExecutor(16) as pool:
        same = list(pool.map(lambda _: request(address, image_path(PHOTO)), range(16)))
        assert [s for s, _, _ in same] == [200] * 16
        assert len({body for _, _, body in same}) == 1  # identical bytes
        assert len(storage.reads) == 1  # single flight: one read, one decode
        assert service.decodes == 1
        assert {h["x-cache"] for _, h, _ in same} <= {"miss", "coalesced", "hit"}

        paths = [image_path(key, query) for key in (PLAIN, PHOTO, ODD)
                 for query in ("format=png", "format=webp", "strip=1")]
        mixed = list(pool.map(lambda p: (p, request(address, p)), paths * 2))
        by_path: dict[str, set] = {}
        for path, (status, _, body) in mixed:
            assert status == 200, path
            by_path.setdefault(path, set()).add(body)
        assert all(len(bodies) == 1 for bodies in by_path.values())


def test_storage_failure_is_503(archive):
    class Down(Storage):
        def read_bytes(self, key: str) -> bytes:
            raise StorageError("read failed after 5 attempts: ConnectionError: down",
                               op="read", target=key, attempts=5, transient=True)

    with serving(DecodeService(Down(str(archive["root"])))) as address:
        status, headers, body = request(address, image_path(PLAIN))
    assert status == 503 and headers["retry-after"]
    payload = json.loads(body)
    assert payload["error"] == "storage_unavailable" and "down" not in payload["message"]


def test_long_names_are_served_or_404_never_503(archive, tmp_path):
    """A last segment of 252+ bytes has no plain `<name>.sga` on a local disk: the stream
    lives under its shortened name (pipeline.keys), and a missing one is a 404."""
    root = tmp_path / "archive"
    long_key = "2024/" + "n" * 251 + ".png"  # a 255-byte file name
    stream = root / bitstream_key(long_key)
    stream.parent.mkdir(parents=True)
    stream.write_bytes(archive["streams"][PLAIN])
    with serving(DecodeService(root)) as address:
        status, _, body = request(address, image_path(long_key))
        assert status == 200 and open_image(body).size == SIZES[PLAIN]
        for missing in ("2024/" + "m" * 251 + ".png", "m" * 300 + ".png"):
            status, headers, body = request(address, image_path(missing))
            assert status == 404 and "retry-after" not in headers, body
            assert json.loads(body)["error"] == "not_found"


def test_paths_that_cannot_exist_are_404(archive, tmp_path):
    """OSErrors that say "no such path can exist" (a name too long for the filesystem, a
    symlink loop) are 404s; only real storage faults are 503s."""

    class TooLong(Storage):
        def read_bytes(self, key: str) -> bytes:  # a real ENAMETOOLONG, through Storage
            return self._call("read", key, lambda: os.stat("/" + "x" * 300))

    with pytest.raises(NotFound):
        DecodeService(TooLong(str(archive["root"]))).read_stream(PLAIN)
    root = tmp_path / "archive"
    (root / "bitstreams").mkdir(parents=True)
    os.symlink("loop.png.sga", root / "bitstreams" / "loop.png.sga")
    with pytest.raises(NotFound):
        DecodeService(root).read_stream("loop.png")


def test_symlinks_out_of_bitstreams_are_not_followed(archive, tmp_path):
    """A link under bitstreams/ to a file elsewhere is a 404: the service must not read
    (and quote) other files. Links that stay inside bitstreams/ work, and bitstreams/
    itself may be a link (to another disk)."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET password=hunter2\n")
    elsewhere = tmp_path / "disk" / "bitstreams"
    elsewhere.mkdir(parents=True)
    (elsewhere / "red.png.sga").write_bytes(archive["streams"][PLAIN])
    (elsewhere / "garbage.png.sga").write_bytes(b"TOP-SECRET bytes, not a stream")
    (elsewhere / "secret.png.sga").symlink_to(secret)
    (elsewhere / "outside.png.sga").symlink_to(archive["root"].parent / "outside.sga")
    (elsewhere / "up.png.sga").symlink_to(tmp_path / "archive" / "other.sga")
    (elsewhere / "alias.png.sga").symlink_to("red.png.sga")
    root = tmp_path / "archive"
    root.mkdir()
    (root / "other.sga").write_bytes(archive["streams"][PLAIN])  # in the archive, not a stream
    (root / "bitstreams").symlink_to(elsewhere)
    with serving(DecodeService(root)) as address:
        for key in ("red.png", "alias.png"):
            status, _, body = request(address, image_path(key))
            assert status == 200 and open_image(body).size == SIZES[PLAIN], key
        for key in ("secret.png", "outside.png", "up.png"):
            status, _, body = request(address, image_path(key))
            assert status == 404, (key, body)
            assert b"SECRET" not in body and b"hunter2" not in body
        status, _, body = request(address, image_path("garbage.png"))
        assert status == 422 and b"SECRET" not in body, body
        assert "not an sgarc bitstream" in json.loads(body)["message"]


def test_corrupt_stream_messages_quote_nothing_from_the_stream():
    assert decode_service.content_free("not an sgarc bitstream (starts with b'TOP-', expected "
                              "b'SGAC')") == "not an sgarc bitstream"
    assert decode_service.content_free("unknown section b'XY\\x00Z'") == "unknown section"
    assert decode_service.content_free("invalid model id 'hunter2'") == "invalid model id"
    kept = "checksum mismatch: the stream is corrupt or truncated"
    assert decode_service.content_free(kept) == kept


def test_service_api(archive):
    service = DecodeService(archive["root"], cache_bytes=0)
    body, content_type = service.get(PHOTO, "jpeg", quality=80, strip_metadata=True)
    assert content_type == "image/jpeg" and open_image(body).size == SIZES[PHOTO]
    with pytest.raises(NotFound):
        service.get("missing.jpg")
    with pytest.raises(BadKey):
        service.get("../secret")
    with pytest.raises(BadRequest):
        service.get(PLAIN, "gif")
    with pytest.raises(decode_service.CorruptStream):
        service.get(CORRUPT)
    assert service.render(PLAIN).cache == "miss" and service.render(PLAIN).cache == "miss"


# ---------------------------------------------------------------------------------------------
# fetch_decode and S3
# ---------------------------------------------------------------------------------------------


def test_fetch_decode_local(archive, tmp_path):
    url = str(archive["root"] / "bitstreams" / (PHOTO + ".sga"))
    out = tmp_path / "out" / "photo.png"
    report = fetch_decode(url, out)
    assert set(report.restored) >= {"exif", "icc"}
    im = open_image(out.read_bytes())
    assert im.size == SIZES[PHOTO] and im.getexif().get(0x010F) == CAMERA
    report = fetch_decode("file://" + url, tmp_path / "photo.webp", strip_metadata=True)
    assert report.stripped and not open_image((tmp_path / "photo.webp").read_bytes()).getexif()
    with pytest.raises(NotFound):
        fetch_decode(str(archive["root"] / "nope.sga"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def s3():
    from tests.s3server import s3_server

    with s3_server() as running:
        yield running


def test_s3_fetch_decode_and_serve(s3, archive, tmp_path):
    bucket = s3.create_bucket()
    client = s3.client()
    for key in (PHOTO, ODD, CORRUPT):
        client.put_object(Bucket=bucket, Key=f"archive/bitstreams/{key}.sga",
                          Body=archive["streams"][key])
    options = s3.storage_options()

    out = tmp_path / "photo.jpg"
    report = fetch_decode(f"s3://{bucket}/archive/bitstreams/{PHOTO}.sga", out, options)
    assert "exif" in report.restored
    assert open_image(out.read_bytes()).getexif().get(0x010F) == CAMERA
    with pytest.raises(NotFound):
        fetch_decode(f"s3://{bucket}/archive/bitstreams/missing.sga", tmp_path / "m.png",
                     options)

    service = DecodeService(f"s3://{bucket}/archive", options)
    with serving(service) as address:
        status, _, body = request(address, image_path(PHOTO))
        assert status == 200 and open_image(body).size == SIZES[PHOTO]
        status, _, body = request(address, image_path(ODD, "format=webp"))
        assert status == 200 and open_image(body).mode == "RGBA"
        assert request(address, image_path("missing.jpg"))[0] == 404
        assert request(address, image_path(CORRUPT))[0] == 422
        assert request(address, "/images/..%2F..%2Fother-bucket%2Fx")[0] == 400
        status, _, body = request(address, "/healthz")
        assert status == 200
        assert json.loads(body)["archive"] == f"s3://{bucket}/archive"
        assert options["secret"] not in body.decode() and options["key"] not in body.decode()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_register_adds_the_serve_command():
    import argparse

    parser = argparse.ArgumentParser(prog="sgarc")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    args = parser.parse_args(["serve", "--archive", "s3://b/a", "--port", "0", "--cache-mb",
                              "16", "--storage-options", '{"anon": true}', "--ray-serve",
                              "--replicas", "auto"])
    assert args.func is serve.cmd_serve and args.archive == "s3://b/a" and args.port == 0
    assert args.cache_mb == 16 and args.ray_serve and args.replicas == "auto"
    bad = parser.parse_args(["serve", "--archive", "x", "--storage-options", "{nope"])
    with pytest.raises(serve.SgarcError, match="not valid JSON"):
        serve.cmd_serve(bad)


def test_run_server_prints_its_url_and_stops_on_ctrl_c(archive):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.serve", "--archive", str(archive["root"]), "--port", "0",
         "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, _, body = request(("127.0.0.1", port), "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert request(("127.0.0.1", port), image_path(PLAIN))[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Ray Serve
# ---------------------------------------------------------------------------------------------


def test_the_app_under_a_route_prefix(archive):
    """The ASGI app as Ray Serve mounts it under a route prefix (root_path), through
    Starlette's TestClient (no server, no Ray)."""
    from starlette.testclient import TestClient

    client = TestClient(make_app(DecodeService(str(archive["root"]))), root_path="/sgarc")
    resp = client.get("/sgarc/images/" + quote(PHOTO), params={"format": "webp"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/webp"
    assert open_image(resp.content).size == SIZES[PHOTO]
    resp = client.get("/sgarc/images/" + quote(PLAIN), headers={"accept": "image/jpeg"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    head = client.head("/sgarc/images/" + quote(PLAIN))
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(client.get("/sgarc/images/red.png").content)
    assert client.get("/sgarc/images/%2e%2e%2fsecret").status_code == 400
    assert client.get("/sgarc/images/nope").status_code == 404
    assert client.get("/sgarc/images/" + quote(CORRUPT)).status_code == 422
    assert client.post("/sgarc/images/x").status_code == 405
    assert client.get("/sgarc/healthz").status_code == 200


def test_a_bug_is_a_500_json_error(archive):
    from starlette.testclient import TestClient

    service = DecodeService(str(archive["root"]))

    def broken(*args):
        raise RuntimeError("a bug")

    service.render_missed = broken
    resp = TestClient(make_app(service), raise_server_exceptions=False).get(image_path(PLAIN))
    assert resp.status_code == 500 and resp.json()["error"] == "internal_error"
    assert "a bug" not in resp.text


def test_ray_serve_end_to_end(archive):
    """A real local Ray with Serve's HTTP proxy (~16 s on 2 cores); skipped without the
    serve extra."""
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve as ray_serve

    from tests.s3server import free_port

    port = free_port()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_serve.run(serve.serve_deployment(str(archive["root"]), num_cpus=0.5),
                      name="sgarc-test", route_prefix="/")
        address = ("127.0.0.1", port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # serve.run returns once ready; be patient anyway
            with contextlib.suppress(OSError):
                if request(address, "/healthz")[0] == 200:
                    break
            time.sleep(0.2)
        status, headers, body = request(address, image_path(PHOTO))
        assert status == 200 and headers["content-type"] == "image/png"
        assert open_image(body).size == SIZES[PHOTO]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: request(address, image_path(ODD)), range(8)))
        assert {s for s, _, _ in results} == {200} and len({b for _, _, b in results}) == 1
        assert request(address, "/images/..%2Fsecret")[0] == 400
        assert request(address, image_path("missing"))[0] == 404
        assert request(address, image_path(CORRUPT))[0] == 422
    finally:
        ray_serve.shutdown()
        if started:
            ray.shutdown()
