"""Weights registry: integrity checked on load, clear errors, nothing fetched."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import shutil

import pytest
import torch

from codec.errors import ModelError
from codec.registry import REGISTRY, entries, find, load, sha256_of, write_model_file


def test_shipped_models_are_registered_and_verified():
    shipped = entries()
    assert shipped, "at least one model ships with sgarc"
    for e in shipped:
        if e.bits_back is not None:  # experimental; loaded by codec.bits_back only
            from codec import bits_back
            lm = bits_back.load(e.id)
        else:
            lm = load(e.id)
        assert (lm.model.N, lm.model.M) == (e.N, e.M)
        assert lm.tables.y_pmfs and len(lm.tables.z_pmfs) == e.N
    assert find().bits_back is None  # the default is never the experimental bits-back model


def test_lookup_by_quality_and_unknown_id(tiny_registry):
    assert find(1, tiny_registry).id == "tiny-test"
    with pytest.raises(ModelError):
        find("1", tiny_registry)  # a string is an id, never a quality level
    with pytest.raises(ModelError, match=r"unknown model 'nope'.*tiny-test"):
        find("nope", tiny_registry)


def test_corrupted_weights_are_refused(tiny_registry, tmp_path):
    reg = tmp_path / "registry.json"
    shutil.copy(tiny_registry, reg)
    entry = json.loads(reg.read_text())["models"][0]
    weights = tmp_path / entry["file"]
    data = bytearray((tiny_registry.parent / entry["file"]).read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="integrity check"):
        load("tiny-test", reg)
    weights.unlink()
    with pytest.raises(ModelError, match="missing"):
        load("tiny-test", reg)


def test_shipped_weights_stay_under_40_mb():
    """The product ships its models in the package: all of them together under 40 MB."""
    total = sum((REGISTRY.parent / e.file).stat().st_size for e in entries())
    assert total < 40_000_000, f"shipped weights are {total / 1e6:.1f} MB"


def test_the_sha256_names_the_model_not_its_packing(tmp_path):
    """The registry's sha256 is of torch.save's bytes, so re-packing a file (xz settings)
    keeps every job fingerprint; the xz dictionary is the file's size, not preset 9's 64 MiB."""
    payload = {"w": torch.arange(1000, dtype=torch.float32)}
    name, sha = write_model_file(payload, "m", tmp_path / "registry.json")
    buf = io.BytesIO()
    torch.save(payload, buf)
    assert sha == hashlib.sha256(buf.getvalue()).hexdigest() == sha256_of(tmp_path / name)
    props = lzma.LZMADecompressor(memlimit=4 << 20)  # fails if the dictionary were larger
    assert props.decompress((tmp_path / name).read_bytes()) == buf.getvalue()
