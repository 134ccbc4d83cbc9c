"""Weights registry: the models that ship with sgarc (DESIGN.md, decision 6).

`codec/weights/registry.json` lists every model: id, quality, lambda, N, M, training steps,
data, file and sha256. Loading checks the file's sha256 before unpickling anything, so a
corrupted or swapped file is refused with a clear error. Nothing is ever downloaded.

A model file holds the float weights (what training and SGA use) and the frozen coding
tables (`codec.frozen`, what entropy coding uses), written by `export_model`.

A variable-rate model (codec.variable_rate) has `lmbdas` in its entry and quality 0 (it
covers every level); its file adds the gains of every rate point. `LoadedModel.at(rate)`
gives its coding view at one rate point: a plain model with the gains folded in and its
exact hyper-synthesis, which the rest of the codec uses like a fixed-rate model. The
quality levels 1..6 name rate points of it (`QUALITY_LMBDAS`, the zoo's λ ladder).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import lzma
import threading
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from codec import weight_store
from codec.errors import ModelError
from codec.files import atomic_write
from codec.frozen import CodingTables, freeze, freeze_hyper_synthesis
from codec.model import MeanScaleHyperprior
from codec.variable_rate import GainedMeanScaleHyperprior, GainTables, grid_index_for_lmbda

WEIGHTS_DIR = Path(__file__).parent / "weights"
REGISTRY = WEIGHTS_DIR / "registry.json"
# The named quality levels: the λ of the fixed-rate zoo msh-small-q1..q6. On a variable-rate
# model, quality q is its rate point nearest to QUALITY_LMBDAS[q].
QUALITY_LMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.013, 5: 0.025, 6: 0.0483}
DEFAULT_QUALITY = 4
_POINTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelEntry:
    id: str
    quality: int
    lmbda: float
    N: int
    M: int
    steps: int
    data: str
    file: str
    sha256: str
    note: str = ""
    lmbdas: tuple[float, ...] | None = None  # trained λ points of a variable-rate model
    default: bool = False  # the model used when none is named
    bits_back: int | None = None  # a bits-back model (codec.bits_back): its z grid bits
    # Variable-rate: encoders use only the grid points that are multiples of rate_step (1:
    # all). msh-vr3 has 32, its trained points: between them its gains do not interpolate
    # (docs/codec.md, "Rate points between the trained ones"). Decoding takes any point.
    rate_step: int = 1
    # Packing (codec.weight_store): the digest of the file's torch.save bytes when the file
    # was re-packed (then it differs from `sha256`, which stays the model's identity), and,
    # for a model whose encoder was retired, the id that encodes instead.
    file_sha256: str | None = None
    decode_only: str | None = None

    def __post_init__(self) -> None:
        if self.lmbdas is not None:
            object.__setattr__(self, "lmbdas", tuple(float(v) for v in self.lmbdas))

    @property
    def variable_rate(self) -> bool:
        return self.lmbdas is not None

    def rate_for_lmbda(self, lmbda: float) -> int:
        """The encodable rate point (a multiple of rate_step) nearest `lmbda` (in log)."""
        if self.lmbdas is None:
            raise ModelError(f"model {self.id} is a fixed-rate model")
        return round(grid_index_for_lmbda(self.lmbdas, lmbda) / self.rate_step) * self.rate_step

    def quality_rate(self, quality: int) -> int:
        """The rate point that quality level `quality` names on this variable-rate model."""
        if quality not in QUALITY_LMBDAS:
            raise ModelError(f"unknown quality {quality}; levels are "
                             f"{min(QUALITY_LMBDAS)}..{max(QUALITY_LMBDAS)}")
        return self.rate_for_lmbda(QUALITY_LMBDAS[quality])


@dataclass
class LoadedModel:
    entry: ModelEntry
    model: MeanScaleHyperprior  # float, eval mode, on CPU
    tables: CodingTables
    variable: GainedMeanScaleHyperprior | None = None  # the whole model, if variable-rate
    gain_tables: GainTables | None = None
    rate: int | None = None  # the rate point `model` and `tables` code at (variable-rate)
    _points: dict[int, LoadedModel] = field(default_factory=dict, repr=False)

    def at(self, rate: int) -> LoadedModel:
        """This variable-rate model's coding view at grid index `rate` (cached)."""
        var, gains = self.variable, self.gain_tables
        if var is None or gains is None:
            raise ModelError(f"model {self.entry.id} is a fixed-rate model: it has no rate "
                             "points")
        if not 0 <= rate <= var.max_rate_index:
            raise ModelError(f"rate point {rate} is outside 0..{var.max_rate_index} of model "
                             f"{self.entry.id}")
        if rate == self.rate:
            return self
        with _POINTS_LOCK:  # decoders in threads (the decode service) share the cache
            point = self._points.pop(rate, None)
            if point is None:
                if len(self._points) >= 32:  # least recently used out; a target search
                    self._points.pop(next(iter(self._points)))  # visits ~9 per image
                net = var.materialize(gains, rate)
                tables = replace(self.tables, hs=freeze_hyper_synthesis(net.h_s))
                entry = replace(self.entry, lmbda=var.rate_lmbda(rate))
                point = LoadedModel(entry, net, tables, var, gains, rate, self._points)
            self._points[rate] = point  # (re)inserted last: most recently used
        return point

    def encodable(self, rate: int) -> int:
        """`rate` if encoders may code at it (ModelError otherwise; ModelEntry.rate_step)."""
        step = self.entry.rate_step
        if rate % step:
            raise ModelError(f"rate point {rate} of model {self.entry.id} is not for encoding: "
                             f"use a multiple of {step} (between its trained points it "
                             "codes poorly; docs/codec.md)")
        return rate

    def quality_rate(self, quality: int) -> int:
        """The rate point that quality level `quality` names on this variable-rate model."""
        return self.entry.quality_rate(quality)

    def rate_for_lmbda(self, lmbda: float) -> int:
        """The encodable rate point nearest `lmbda` (in log)."""
        return self.entry.rate_for_lmbda(lmbda)

    def on(self, device: torch.device | str) -> MeanScaleHyperprior:
        """The float model on `device`; the CPU copy is never moved, others are cached."""
        return on_device(self.model, self.__dict__.setdefault("_copies", {}), device)


def on_device(model: nn.Module, copies: dict, device: torch.device | str) -> nn.Module:
    """`model` on `device`: the CPU model itself (never moved), elsewhere a copy made once
    and kept in `copies` (device -> model)."""
    device = torch.device(device)
    if device.type == "cpu":
        return model
    if device not in copies:
        copies[device] = copy.deepcopy(model).to(device)
    return copies[device]


def entries(registry: Path = REGISTRY) -> list[ModelEntry]:
    if not registry.exists():
        return []
    return [ModelEntry(**e) for e in json.loads(registry.read_text())["models"]]


def find(model: str | int | None = None, registry: Path = REGISTRY) -> ModelEntry:
    """Entry by id (str) or by quality level (int); None gives the default. With a
    variable-rate default, a quality level is that model's named rate point.

    A string is only ever an id, so a stream naming model "1" cannot pick quality 1.
    """
    known = entries(registry)
    if not known:
        raise ModelError(f"no models registered in {registry}")
    default = _default(known)
    if model is None:
        return default
    if isinstance(model, int) and default.variable_rate and model in QUALITY_LMBDAS:
        # a named rate point of the default model (LoadedModel.quality_rate), ahead of the
        # fixed level of that number, which the default supersedes (decode-only then)
        return default
    for e in known:
        if e.id == model if isinstance(model, str) else e.quality == model:
            return e
    qualities = ", ".join(str(e.quality) for e in sorted(known, key=lambda e: e.quality)
                          if e.quality)
    raise ModelError(f"unknown model {model!r}; known ids: {', '.join(e.id for e in known)}; "
                     f"qualities: {qualities} (see `sgarc models`)")


def _default(known: list[ModelEntry]) -> ModelEntry:
    """The entry marked default, else the middle fixed quality level."""
    marked = [e for e in known if e.default]
    if marked:
        return marked[0]
    ordered = sorted((e for e in known if not e.variable_rate and e.bits_back is None),
                     key=lambda e: e.quality)
    ordered = ordered or known
    return ordered[len(ordered) // 2]


def sha256_of(path: Path) -> str:
    """The sha256 a registry entry records for model file `path` (`read_model_file`)."""
    return hashlib.sha256(_model_bytes(path)).hexdigest()


def _model_bytes(path: Path) -> bytes:
    """The torch.save bytes of a model file (`.xz` decompressed)."""
    raw = path.read_bytes()
    if path.suffix != ".xz":
        return raw
    try:
        return lzma.decompress(raw)
    except lzma.LZMAError as e:
        raise ModelError(f"weights file {path} fails its integrity check (not a valid .xz "
                         f"file: {e}); reinstall sgarc") from None


def weight_file_filters(size: int) -> list[dict]:
    """xz filters for a model file of `size` bytes: LZMA2 tuned for arrays of 2-, 4- and
    8-byte numbers (lc=0: no literal context; lp=pb=2: positions modulo 4), 4% smaller than
    the default preset on the shipped weights and still a plain .xz file. The dictionary is
    the file's own size (never smaller, so nothing is lost): the decoder allocates all of
    it, and preset 9's 64 MiB would be most of a bounded decode's memory."""
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
             "dict_size": max(size, 1 << 16), "lc": 0, "lp": 2, "pb": 2}]


def read_model_file(entry: ModelEntry, registry: Path = REGISTRY) -> dict:
    """The payload of `entry`'s file; `.xz` files are decompressed (`write_model_file`), and
    tensors shared with other files are put back (`codec.weight_store`).

    The sha256 is of the model's torch.save bytes (after decompression), checked before
    anything is unpickled: it names the model, not its packing, so job fingerprints (which
    hash it) did not change when the files became .xz. A re-packed file is checked against
    `file_sha256` instead, and each shared tensor against its digest."""
    path = registry.parent / entry.file
    if not path.exists():
        raise ModelError(f"weights file {path} of model {entry.id!r} is missing; reinstall sgarc")
    raw = _model_bytes(path)
    digest, expected = hashlib.sha256(raw).hexdigest(), entry.file_sha256 or entry.sha256
    if digest != expected:
        raise ModelError(f"weights file {path} fails its integrity check (sha256 {digest[:12]}… "
                         f"expected {expected[:12]}…); reinstall sgarc")
    return weight_store.resolve(torch.load(io.BytesIO(raw), map_location="cpu",
                                           weights_only=True), registry.parent)


def write_model_file(payload: dict, model_id: str, registry: Path = REGISTRY
                     ) -> tuple[str, str]:
    """Write `payload` as `{model_id}.pt.xz` atomically; returns (file name, sha256 of the
    torch.save bytes, as `read_model_file` checks it).

    Why xz: float16 weights and float64 pmf tables shrink by about 20% (lzma, stdlib) and
    the shipped weights must stay under 40 MB together; decompressing takes ~0.2 s per
    model, once per process (load is cached). The tensors are the same bits either way."""
    path = registry.parent / f"{model_id}.pt.xz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.name, write_xz(payload, path)


def write_xz(payload: dict, path: Path) -> str:
    """torch.save `payload`, xz-compressed (`weight_file_filters`), atomically to `path`;
    returns the sha256 of the torch.save bytes (model files and the shared weights file)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    raw = buf.getvalue()
    atomic_write(path, lzma.compress(raw, filters=weight_file_filters(len(raw))))
    return hashlib.sha256(raw).hexdigest()


@lru_cache(maxsize=8)
def load(model: str | int | None = None, registry: Path = REGISTRY) -> LoadedModel:
    entry = find(model, registry)
    if entry.bits_back is not None:
        raise ModelError(f"model {entry.id!r} is an experimental bits-back model: it encodes "
                         "with --method sga-bb (or bb-no-sga, bb-amortized) only")
    state = read_model_file(entry, registry)
    weights = {k: v.float() for k, v in state["state_dict"].items()}
    if entry.variable_rate:
        var = GainedMeanScaleHyperprior(entry.N, entry.M, entry.lmbdas)
        _load_weights(var, var.base, weights, entry)
        var.eval()
        gains = GainTables.from_state_dict(state["gains"])
        whole = LoadedModel(entry, var.base, CodingTables.from_state_dict(
            state["tables"], var.base.h_s), var, gains)
        return whole.at(whole.rate_for_lmbda(QUALITY_LMBDAS[DEFAULT_QUALITY]))
    net = MeanScaleHyperprior(entry.N, entry.M)
    _load_weights(net, net, weights, entry)
    net.eval()
    return LoadedModel(entry, net, CodingTables.from_state_dict(state["tables"], net.h_s))


def _load_weights(model: nn.Module, base: MeanScaleHyperprior, weights: dict,
                  entry: ModelEntry) -> None:
    """Load `weights`; a decode-only model's file lacks g_a and h_a (only those), which are
    then marked retired so that encoding is refused (codec.weight_store)."""
    if entry.decode_only is None:
        model.load_state_dict(weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    prefix = "base." if base is not model else ""
    if unexpected or any(not k.startswith(tuple(f"{prefix}{p}." for p in
                                                weight_store.ENCODER_PARTS)) for k in missing):
        raise ModelError(f"weights file of decode-only model {entry.id} lacks decoder weights "
                         "or holds unknown ones; reinstall sgarc")
    weight_store.retire_encoder(base, entry.id, entry.decode_only)


def load_point(model: str | int | None = None, rate: int | None = None,
               registry: Path = REGISTRY) -> LoadedModel:
    """A model ready to code: fixed-rate as it is; variable-rate at grid index `rate`, or at
    the rate point a quality level names, or at its default point (quality 4)."""
    lm = load(model, registry)
    if rate is not None:
        return lm.at(lm.encodable(rate))
    if lm.variable is not None and isinstance(model, int) and lm.entry.quality != model:
        return lm.at(lm.quality_rate(model))
    return lm


def export_model(model: MeanScaleHyperprior | GainedMeanScaleHyperprior, model_id: str,
                 quality: int, lmbda: float, steps: int, data: str, note: str = "",
                 registry: Path = REGISTRY, half: bool = False,
                 default: bool = False) -> ModelEntry:
    """Freeze the coding tables, write the model file and (re)register it atomically.

    A variable-rate model is registered with quality 0 and its λ points; its file adds the
    gain tables, and every rate point's exact hyper-synthesis is checked here (an
    accumulator bound that fails would otherwise fail at decode time).
    """
    model = model.cpu().eval()
    if half:  # store fp16, then freeze from exactly the weights the decoder will load
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    variable = isinstance(model, GainedMeanScaleHyperprior)
    tables = freeze(model.base if variable else model)
    sd = {k: (v.half() if half and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    payload = {"state_dict": sd, "tables": tables.state_dict()}
    if variable:
        gains = model.gain_tables()
        for index in range(model.max_rate_index + 1):
            freeze_hyper_synthesis(model.materialize(gains, index).h_s)
        payload["gains"] = gains.state_dict()
        quality, lmbda = 0, model.rate_lmbda(model.rate_for_lmbda(
            QUALITY_LMBDAS[DEFAULT_QUALITY]))
    name, sha = write_model_file(payload, model_id, registry)
    entry = ModelEntry(model_id, quality, lmbda, model.N, model.M, steps, data, name, sha, note,
                       model.lmbdas if variable else None, default)
    register(entry, registry, replaces_quality=not variable)
    return entry


def register(entry: ModelEntry, registry: Path = REGISTRY,
             replaces_quality: bool = False) -> None:
    """Add (or replace) an entry, atomically; a fixed-rate model replaces the one of its
    quality level, a default one takes the mark from the others."""
    others = [e for e in entries(registry) if e.id != entry.id
              and not (replaces_quality and e.quality == entry.quality)]
    if entry.default:
        others = [replace(e, default=False) for e in others]
    models = sorted([*others, entry], key=lambda e: e.quality)
    atomic_write(registry, (json.dumps({"models": [_as_json(e) for e in models]}, indent=2)
                             + "\n").encode())
    load.cache_clear()



def _as_json(entry: ModelEntry) -> dict:
    """The entry as the registry stores it: optional fields only where they are set."""
    d = asdict(entry)
    if d["lmbdas"] is None:
        del d["lmbdas"]
    else:
        d["lmbdas"] = list(d["lmbdas"])
    if not d["default"]:
        del d["default"]
    for name in ("bits_back", "file_sha256", "decode_only"):
        if d[name] is None:
            del d[name]
    return d
