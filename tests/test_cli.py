"""The sgarc command line, run in-process through its entry point."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from tests.conftest import SHIPPED_VR_ID, smooth_image


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(smooth_image(70, 90)).save(path)
    return path


def test_encode_info_decode(photo, tmp_path, capsys):
    stream, out = tmp_path / "photo.sga", tmp_path / "back.png"
    assert main(["encode", str(photo), str(stream), "--method", "sga", "--iterations", "3"]) == 0
    line = capsys.readouterr().out
    assert "bpp" in line and "PSNR" in line and "est" in line and "actual" in line
    assert main(["info", str(stream)]) == 0
    info = capsys.readouterr().out
    assert "90x70" in info and "model:" in info
    assert "layout: y coded on 5x6 of 8x8" in info or "layout: y coded on 6x7 of 8x8" in info
    assert main(["decode", str(stream), str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (70, 90, 3)
    webp = tmp_path / "back.webp"  # any fsspec URL, and -o
    assert main(["decode", stream.as_uri(), "-o", str(webp)]) == 0
    assert Image.open(webp).size == (90, 70)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    assert "quality" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.sga"
    bad.write_bytes(b"not a stream at all, sorry")
    assert main(["decode", str(bad), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "not an sgarc bitstream" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
    assert main(["encode", str(bad), str(tmp_path / "y.sga")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "y.sga").exists()


def test_alpha_needs_a_decision_when_asked(tmp_path, capsys):
    rgba = np.dstack([smooth_image(20, 20), np.full((20, 20), 7, np.uint8)])
    path = tmp_path / "a.png"
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    assert main(["encode", str(path), str(tmp_path / "a.sga"), "--alpha", "error",
                 "--method", "amortized"]) == 2
    assert "alpha" in capsys.readouterr().err


def test_encode_to_a_psnr_target(tmp_path, capsys):
    from skimage import data

    path = tmp_path / "crop.png"
    Image.fromarray(data.astronaut()[100:196, 150:246]).save(path)
    stream = tmp_path / "crop.sga"
    assert main(["encode", str(path), str(stream), "--model", SHIPPED_VR_ID, "-m", "amortized",
                 "--target-psnr", "31"]) == 0
    out = capsys.readouterr()
    assert "target PSNR ≥ 31 dB met" in out.out and "rate point" in out.out
    assert main(["encode", str(path), str(stream), "--model", SHIPPED_VR_ID, "-m", "amortized",
                 "--target-psnr", "80"]) == 0
    out = capsys.readouterr()
    assert "MISSED" in out.out and "out of reach" in out.err
    assert main(["encode", str(path), str(stream), "-m", "amortized", "--target-bpp",
                 "1"]) == 0  # the default model is variable-rate
    assert "target" in capsys.readouterr().out
    assert main(["encode", str(path), str(stream), "--model", "msh-small-q4", "-m",
                 "amortized"]) == 2  # the zoo, decode-only
    assert "decode-only" in capsys.readouterr().err
    assert main(["models"]) == 0
    assert "variable rate" in capsys.readouterr().out


def test_run_prints_only_what_sgarc_means_to_say(tmp_path):
    """The embedded Ray starts with Ray's defaults (token authentication on) and none of its
    notices reach the terminal."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(smooth_image(32, 32)).save(src / "a.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(src),
                           str(tmp_path / "out"), "-m", "amortized", "--actors", "1"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "encode run" in proc.stdout
    assert "Token authentication" not in proc.stdout + proc.stderr
    assert "INFO" not in proc.stdout + proc.stderr


def test_floor_keeps_a_jpeg_bit_exact(tmp_path, capsys):
    """`sgarc encode --min-psnr` above the model's reach: the JPEG XL transcode, and
    `sgarc decode x.sga out.jpg` writes the original file back."""
    photo = tmp_path / "photo.jpg"
    Image.fromarray(smooth_image(96, 128)).save(photo, quality=95)
    stream, back = tmp_path / "photo.sga", tmp_path / "back.jpg"
    assert main(["encode", str(photo), str(stream), "-m", "amortized", "--min-psnr", "60"]) == 0
    captured = capsys.readouterr()
    assert "route jpeg-lossless" in captured.out and "below the floor" in captured.err
    assert stream.stat().st_size < photo.stat().st_size
    assert main(["info", str(stream)]) == 0
    info = capsys.readouterr().out
    assert "route:       jpeg-lossless" in info and "section:     JXLJ" in info
    assert main(["decode", str(stream), str(back)]) == 0
    assert "byte for byte" in capsys.readouterr().out
    assert back.read_bytes() == photo.read_bytes()
