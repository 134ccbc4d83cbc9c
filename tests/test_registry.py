"""Weights registry: integrity checked on load, clear errors, nothing fetched."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import shutil

import numpy as np
import pytest
import torch

from codec.errors import ModelError
from codec.images import load_image
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
    from codec.weight_store import BUDGET_BYTES, SHARED_FILE, over_budget_message, weight_bytes

    files = {e.file for e in entries()} | {SHARED_FILE}
    assert {p.name for p in REGISTRY.parent.iterdir()} == files | {REGISTRY.name}
    assert BUDGET_BYTES == 40_000_000
    message = over_budget_message(weight_bytes(REGISTRY))
    assert message is None, message


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


# ----------------------------------------------------------------------------- packing


def _image():
    from PIL import Image

    from tests.conftest import smooth_image

    buf = io.BytesIO()
    Image.fromarray(smooth_image(48, 64)).save(buf, format="PNG")
    return load_image(buf.getvalue())


def _two_models(tiny_vr_registry, tmp_path):
    """A copy of the tiny registry (a fixed-rate and a variable-rate model): their y coding
    tables are the same array, so packing shares it."""
    reg = tmp_path / "registry.json"
    for f in tiny_vr_registry.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return reg


def test_packing_shares_tensors_and_keeps_every_bit(tiny_vr_registry, tmp_path):
    from codec import weight_store
    from codec.api import Codec, decode
    from codec.registry import read_model_file
    from tests.conftest import TINY_ID, TINY_VR_ID

    reg = _two_models(tiny_vr_registry, tmp_path)
    before = {e.id: read_model_file(e, reg) for e in entries(reg)}
    image = _image()
    streams = {m: Codec(m, device="cpu", registry=reg).encode(image).data
               for m in (TINY_ID, TINY_VR_ID)}
    pixels = {m: decode(s, registry=reg).rgb for m, s in streams.items()}
    sizes_before = {e.file: (tmp_path / e.file).stat().st_size for e in entries(reg)}

    weight_store.pack(reg)
    assert (tmp_path / weight_store.SHARED_FILE).exists()
    for e in entries(reg):
        assert e.sha256 == next(x for x in entries(tiny_vr_registry) if x.id == e.id).sha256
        assert e.file_sha256 is not None and e.file_sha256 != e.sha256  # identity kept
        assert (tmp_path / e.file).stat().st_size < sizes_before[e.file]
        after = read_model_file(e, reg)
        for part in ("state_dict", "tables", "gains"):
            if part not in before[e.id]:
                continue  # a fixed-rate model has no gain tables
            assert after[part].keys() == before[e.id][part].keys()
            assert all(torch.equal(after[part][k], v) and after[part][k].dtype == v.dtype
                       for k, v in before[e.id][part].items())
    load.cache_clear()
    for m, s in streams.items():
        assert np.array_equal(decode(s, registry=reg).rgb, pixels[m])


def test_a_retired_encoder_still_decodes_and_refuses_to_encode(tiny_vr_registry, tmp_path):
    from codec import weight_store
    from codec.api import Codec, decode
    from tests.conftest import TINY_ID, TINY_VR_ID

    reg = _two_models(tiny_vr_registry, tmp_path)
    image = _image()
    stream = Codec(TINY_VR_ID, device="cpu", registry=reg, rate=5).encode(image).data
    pixels = decode(stream, registry=reg).rgb
    size = (tmp_path / find(TINY_VR_ID, reg).file).stat().st_size

    weight_store.pack(reg, retire={TINY_VR_ID: TINY_ID})
    load.cache_clear()
    entry = find(TINY_VR_ID, reg)
    assert entry.decode_only == TINY_ID
    assert (tmp_path / entry.file).stat().st_size < 0.8 * size  # g_a and h_a are gone
    assert np.array_equal(decode(stream, registry=reg).rgb, pixels)
    with pytest.raises(ModelError, match=f"{TINY_VR_ID} is decode-only.*encode with {TINY_ID}"):
        Codec(TINY_VR_ID, device="cpu", registry=reg)
    with pytest.raises(ModelError, match="decode-only"):  # whatever path reaches the encoder
        load(TINY_VR_ID, reg).at(3).model.g_a(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ModelError, match="must be registered"):
        weight_store.pack(reg, retire={"nope": TINY_ID})


def test_retiring_a_successor_repoints_the_models_it_succeeded(tiny_vr_registry, tmp_path):
    """A chain of successors (tiny fixed -> tiny vr -> a newer one): when the middle model
    is retired, the first names the newest as the one that encodes instead, not a
    decode-only model; a retired default hands the mark to its successor."""
    from dataclasses import replace

    from codec import weight_store
    from codec.registry import export_model, register
    from codec.variable_rate import GainedMeanScaleHyperprior
    from tests.conftest import TINY_ID, TINY_VR_ID

    reg = _two_models(tiny_vr_registry, tmp_path)
    assert weight_store.parse_retire([f"{TINY_ID}={TINY_VR_ID}"]) == {TINY_ID: TINY_VR_ID}
    with pytest.raises(ModelError, match="OLD=NEW"):
        weight_store.parse_retire([TINY_ID])
    weight_store.pack(reg, retire={TINY_ID: TINY_VR_ID})
    newer = GainedMeanScaleHyperprior(N=16, M=24, lmbdas=(0.002, 0.008, 0.032))
    export_model(newer, "tiny-vr-newer", quality=0, lmbda=0.0, steps=0, data="untrained",
                 registry=reg, half=True)
    weight_store.pack(reg, retire={TINY_VR_ID: "tiny-vr-newer"})
    assert find(TINY_ID, reg).decode_only == find(TINY_VR_ID, reg).decode_only == \
        "tiny-vr-newer"
    assert [e.id for e in entries(reg) if e.default] == []  # none was the default here

    register(replace(find("tiny-vr-newer", reg), default=True), reg)
    export_model(newer, "tiny-vr-newest", quality=0, lmbda=0.0, steps=0, data="untrained",
                 registry=reg, half=True)
    weight_store.pack(reg, retire={"tiny-vr-newer": "tiny-vr-newest"})
    assert [e.id for e in entries(reg) if e.default] == ["tiny-vr-newest"]  # it must encode


def test_gain_tables_pack_as_their_trained_rows(tiny_vr_registry, tmp_path):
    """A variable-rate file keeps its 9 trained gain rows and a zero difference from their
    IEEE-only interpolation, not 257 rows; the tables come back bit for bit, and a damaged
    difference is refused by the table's digest."""
    from codec import weight_store
    from codec.registry import read_model_file
    from codec.variable_rate import GainedMeanScaleHyperprior
    from tests.conftest import TINY_VR_ID

    net = GainedMeanScaleHyperprior(8, 8)
    with torch.no_grad():  # trained-looking gains: apart per channel and rate point
        for name in ("gain", "inverse_gain", "hyper_gain", "hyper_inverse_gain"):
            getattr(net, name).copy_(torch.rand_like(getattr(net, name)) * 3 + 0.1)
    tables = net.gain_tables().state_dict()
    packed = weight_store.compact_gains(tables)
    for name, part in packed.items():
        if name != "form":
            assert part["trained"].shape == (9, tables[name].shape[1])
            assert not part["residual"].any()  # the prediction is the exp/log table itself
    back = weight_store.expand_gains(packed)
    assert all(torch.equal(back[k], t) and back[k].dtype == torch.float32
               for k, t in tables.items())
    packed["gains.gain"]["residual"][3, 0] += 1  # one float32 ulp off at one rate point
    with pytest.raises(ModelError, match=r"gain table gains\.gain fails its integrity check"):
        weight_store.expand_gains(packed)

    reg = _two_models(tiny_vr_registry, tmp_path)
    entry = find(TINY_VR_ID, reg)
    before = read_model_file(entry, reg)["gains"]
    weight_store.pack(reg)
    raw = lzma.decompress((tmp_path / entry.file).read_bytes())
    stored = torch.load(io.BytesIO(raw), weights_only=True)["gains"]
    assert stored["form"] == weight_store.GAINS_FORM
    after = read_model_file(find(TINY_VR_ID, reg), reg)["gains"]
    assert all(torch.equal(after[k], t) for k, t in before.items())


def test_damaged_shared_weights_are_refused(tiny_vr_registry, tmp_path):
    from codec import weight_store

    reg = _two_models(tiny_vr_registry, tmp_path)
    weight_store.pack(reg)
    shared = tmp_path / weight_store.SHARED_FILE
    good = shared.read_bytes()
    payload = torch.load(io.BytesIO(lzma.decompress(good)), weights_only=True)
    key = next(iter(payload))
    payload[key] = payload[key].clone()
    payload[key].view(-1)[0] += 1  # a flipped value under the right name
    buf = io.BytesIO()
    torch.save(payload, buf)
    shared.write_bytes(lzma.compress(buf.getvalue()))
    weight_store._store.cache_clear()
    load.cache_clear()
    with pytest.raises(ModelError, match=r"shared weights .* integrity check"):
        load(entries(reg)[0].id, reg)
    shared.unlink()
    weight_store._store.cache_clear()
    load.cache_clear()
    with pytest.raises(ModelError, match="missing; reinstall"):
        load(entries(reg)[0].id, reg)


def test_every_shipped_model_decodes_its_reference_streams():
    """Streams written by each shipped model before its file was ever re-packed (or its
    encoder retired) decode to the same pixels now (tests/reference_streams.py)."""
    import base64

    from PIL import Image

    from codec.bitstream import PAD_MODES, TIGHT_MARGINS
    from tests.reference_streams import FILE, decoded, layout, pixels_sha256

    streams = json.loads(FILE.read_text())
    shipped = {e.id: e for e in entries()}
    learned = {e.id for e in shipped.values() if e.bits_back is None}
    assert learned <= {r["model"] for r in streams}, "run python -m tests.reference_streams"
    encodable = {e.id for e in shipped.values() if e.bits_back is None and not e.decode_only}
    assert encodable <= {r["model"] for r in streams if layout(r) in TIGHT_MARGINS}, \
        "run python -m tests.reference_streams"  # what encoders write now, too
    assert {layout(r) for r in streams} == set(PAD_MODES)  # every layout ever written
    for r in streams:
        assert shipped[r["model"]].sha256 == r["sha256_of_model"]  # the identity never moves
        latents, rgb = decoded(base64.b64decode(r["stream"]))
        assert latents == r["latents_sha256"], (r["model"], r["rate"])  # exact everywhere
        if pixels_sha256(rgb) != r["pixels_sha256"]:  # another CPU's float kernels: 1 level
            recorded = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["pixels_png"]))))
            diff = np.abs(rgb.astype(int) - recorded.astype(int))
            assert diff.max() <= 1, (r["model"], r["rate"], int(diff.max()))


def test_decode_only_shipped_models_are_refused_for_jobs():
    from pipeline.settings import EncodeSettings

    for e in entries():
        if e.decode_only:
            assert find(e.decode_only).decode_only is None  # the successor encodes
            with pytest.raises(ValueError, match=f"{e.id} is decode-only"):
                EncodeSettings(model=e.id, method="amortized").fingerprint()
