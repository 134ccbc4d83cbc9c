"""Weights registry: integrity checked on load, clear errors, nothing fetched."""

from __future__ import annotations

import json
import shutil

import pytest

from codec.errors import ModelError
from codec.registry import REGISTRY, entries, find, load, sha256_of


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
    assert sha256_of(weights) != entry["sha256"]
    with pytest.raises(ModelError, match="integrity check"):
        load("tiny-test", reg)
    weights.unlink()
    with pytest.raises(ModelError, match="missing"):
        load("tiny-test", reg)


def test_shipped_weights_stay_under_40_mb():
    """The product ships its models in the package: all of them together under 40 MB."""
    total = sum((REGISTRY.parent / e.file).stat().st_size for e in entries())
    assert total < 40_000_000, f"shipped weights are {total / 1e6:.1f} MB"
