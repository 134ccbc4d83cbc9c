"""The report's gallery: crops of the worst images, source beside the decoded bitstream.

Real components: streams are coded by the shipped model (amortized, tiny images), written
where the pipeline writes them, with metrics parts from `pipeline.sink`; the page is parsed
strictly and its embedded images are read back with Pillow.
"""

from __future__ import annotations

import base64
import hashlib
import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from codec.api import Codec, decode
from codec.images import load_image
from codec.inference import InferenceConfig
from jobs import report
from pipeline import sink
from pipeline.storage import Storage
from tests.conftest import smooth_image
from tests.test_metrics import cli, ok_row, parse_page, ts

NS = {"h": "http://www.w3.org/1999/xhtml"}


def test_worst_window_finds_the_largest_error():
    src = np.zeros((40, 60, 3), np.uint8)
    dec = src.copy()
    dec[25:35, 41:51] = 30  # a 10x10 patch off by 30: the only error
    dec[0, 0] = 5
    assert report.worst_window(src, dec, 10) == (25, 41, 10, pytest.approx(900.0))
    top, left, side, mse = report.worst_window(src, dec, 100)  # clipped to the image
    assert (top, side) == (0, 40) and 11 <= left <= 20  # every window holding the patch
    assert mse == pytest.approx(900 * 100 / 1600)


@pytest.fixture
def archive(tmp_path, one_thread):
    """Three learned rows with real streams (one whose source is gone), a stream replaced
    by a later run, and a lossless-route row (no distortion, never in the gallery)."""
    photos, out = tmp_path / "photos", tmp_path / "archive"
    photos.mkdir()
    storage, codec = Storage(str(out)), Codec(device="cpu")
    rows, streams = [], {}
    for i, key in enumerate(["a.png", "b.png", "gone.png", "replaced.png"]):
        rgb = smooth_image(48, 64, seed=i)
        rgb[8:24, 30:46] = np.random.default_rng(i).integers(0, 256, (16, 16, 3))  # hard part
        Image.fromarray(rgb).save(photos / key)
        res = codec.encode(load_image(photos / key), InferenceConfig(method="amortized"))
        streams[key] = res.data
        storage.write_atomic(sink.bitstream_key(key), res.data)
        rows.append(ok_row("r1", key, src=(photos / key).stat().st_size, out=len(res.data),
                           w=64, h=48, psnr=res.psnr, secs=1.0, when=ts(1),
                           bitstream_sha256=hashlib.sha256(res.data).hexdigest(),
                           source_url=(photos / key).as_uri()))
    (photos / "gone.png").unlink()
    storage.write_atomic(sink.bitstream_key("replaced.png"), streams["a.png"])
    rows.append(ok_row("r1", "lossless.jpg", src=100, out=90, w=8, h=8, psnr=100.0, secs=1.0,
                       when=ts(1), route="original", source_url="file:///nowhere.jpg"))
    storage.write_atomic(sink.part_key("r1", "p0"), sink.part_bytes(rows))
    return out, photos, streams


def test_gallery_shows_source_and_decoded_crops(archive, tmp_path, capsys):
    out, photos, streams = archive
    path = tmp_path / "report.html"
    assert cli(["report", str(out), "-o", str(path), "--pictures", "3"]) == 0
    root = parse_page(path.read_text(encoding="utf-8"))
    figures = root.findall(".//h:figure[@class='pair']", NS)
    keys = ["".join(f.find("h:figcaption", NS).itertext()).split(" ")[0] for f in figures]
    assert sorted(keys) == ["a.png", "b.png"]  # gone.png's source and replaced.png: skipped
    notes = "".join(root.find(".//h:ul[@class='note']", NS).itertext())
    assert "gone.png" in notes and "replaced.png: ValueError: the bitstream was replaced" in notes
    assert "lossless.jpg" not in path.read_text().split('id="gallery"')[1]

    for fig, key in zip(figures, keys, strict=True):
        shown = [Image.open(io.BytesIO(base64.b64decode(img.get("src").split(",", 1)[1])))
                 for img in fig.iterfind(".//h:img", NS)]
        source = load_image(photos / key).rgb
        decoded = decode(streams[key]).rgb
        top, left, side, _ = report.worst_window(source, decoded, report.CROP)
        window = np.s_[top:top + side, left:left + side]
        assert side == 48  # the image's shorter side: the crop is never larger than the image
        assert np.array_equal(np.asarray(shown[0].convert("RGB")), source[window])  # lossless
        assert np.array_equal(np.asarray(shown[1].convert("RGB")), decoded[window])
        assert f"x {left}, y {top}" in "".join(fig.itertext())


def test_gallery_off_and_bad_count(archive, tmp_path):
    out, _, _ = archive
    path = report.write_report(str(out), tmp_path / "r.html", pictures=0)
    root = ET.fromstring(path.read_text(encoding="utf-8").removeprefix("<!DOCTYPE html>\n"))
    assert root.find(".//h:img[@class='crop']", NS) is None
    assert root.find(".//h:h2[@id='gallery']", NS) is None
    with pytest.raises(report.MetricsError, match="--pictures must be >= 0"):
        cli(["report", str(out), "-o", str(tmp_path / "x.html"), "--pictures", "-1"])
    assert not (tmp_path / "x.html").exists()
