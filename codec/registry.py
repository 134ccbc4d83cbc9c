"""Weights registry: the models that ship with sgarc (DESIGN.md, decision 6).

`codec/weights/registry.json` lists every model: id, quality, lambda, N, M, training steps,
data, file and sha256. Loading checks the file's sha256 before unpickling anything, so a
corrupted or swapped file is refused with a clear error. Nothing is ever downloaded.

A model file holds the float weights (what training and SGA use) and the frozen coding
tables (`codec.frozen`, what entropy coding uses), written by `export_model`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from codec.errors import ModelError
from codec.files import atomic_write
from codec.frozen import CodingTables, freeze
from codec.model import MeanScaleHyperprior

WEIGHTS_DIR = Path(__file__).parent / "weights"
REGISTRY = WEIGHTS_DIR / "registry.json"


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


@dataclass
class LoadedModel:
    entry: ModelEntry
    model: MeanScaleHyperprior  # float, eval mode, on CPU
    tables: CodingTables

    def on(self, device: torch.device | str) -> MeanScaleHyperprior:
        """The float model on `device`; the CPU copy is never moved, others are cached."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.model
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copies[device] = copy.deepcopy(self.model).to(device)
        return copies[device]


def entries(registry: Path = REGISTRY) -> list[ModelEntry]:
    if not registry.exists():
        return []
    return [ModelEntry(**e) for e in json.loads(registry.read_text())["models"]]


def find(model: str | int | None = None, registry: Path = REGISTRY) -> ModelEntry:
    """Entry by id (str) or by quality level (int); None gives the default.

    A string is only ever an id, so a stream naming model "1" cannot pick quality 1.
    """
    known = entries(registry)
    if not known:
        raise ModelError(f"no models registered in {registry}")
    if model is None:
        return _default(known)
    for e in known:
        if e.id == model if isinstance(model, str) else e.quality == model:
            return e
    qualities = ", ".join(str(e.quality) for e in sorted(known, key=lambda e: e.quality))
    raise ModelError(f"unknown model {model!r}; known ids: {', '.join(e.id for e in known)}; "
                     f"qualities: {qualities} (see `sgarc models`)")


def _default(known: list[ModelEntry]) -> ModelEntry:
    """The middle quality level: a sensible archive default."""
    ordered = sorted(known, key=lambda e: e.quality)
    return ordered[len(ordered) // 2]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=8)
def load(model: str | int | None = None, registry: Path = REGISTRY) -> LoadedModel:
    entry = find(model, registry)
    path = registry.parent / entry.file
    if not path.exists():
        raise ModelError(f"weights file {path} of model {entry.id!r} is missing; reinstall sgarc")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry.sha256:
        raise ModelError(f"weights file {path} fails its integrity check (sha256 {digest[:12]}… "
                         f"expected {entry.sha256[:12]}…); reinstall sgarc")
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    net = MeanScaleHyperprior(entry.N, entry.M)
    net.load_state_dict({k: v.float() for k, v in state["state_dict"].items()})
    net.eval()
    return LoadedModel(entry, net, CodingTables.from_state_dict(state["tables"], net.h_s))


def export_model(model: MeanScaleHyperprior, model_id: str, quality: int, lmbda: float,
                 steps: int, data: str, note: str = "", registry: Path = REGISTRY,
                 half: bool = False) -> ModelEntry:
    """Freeze the coding tables, write the model file and (re)register it atomically."""
    model = model.cpu().eval()
    if half:  # store fp16, then freeze from exactly the weights the decoder will load
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    tables = freeze(model)
    sd = {k: (v.half() if half and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "tables": tables.state_dict()}, buf)
    registry.parent.mkdir(parents=True, exist_ok=True)
    path = registry.parent / f"{model_id}.pt"
    atomic_write(path, buf.getvalue())
    entry = ModelEntry(model_id, quality, lmbda, model.N, model.M, steps, data, path.name,
                       hashlib.sha256(buf.getvalue()).hexdigest(), note)
    others = [e for e in entries(registry) if e.id != model_id and e.quality != quality]
    models = sorted([*others, entry], key=lambda e: e.quality)
    atomic_write(registry, (json.dumps({"models": [asdict(e) for e in models]}, indent=2)
                             + "\n").encode())
    load.cache_clear()
    return entry

