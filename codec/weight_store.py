"""Packing of the shipped weights: tensors shared between model files, retired encoders.

Why: every shipped model id keeps decoding for good (docs/bitstream.md), and all the shipped
weights together must stay under 40 MB. Two things make room without changing a single bit
that any stream's decoding reads:

* **Shared tensors.** Model files repeat each other: every model's y coding table (69,530
  float64 pmfs of the fixed scale table) is the same array, and the bits-back model's g_a and
  g_s are msh-small-q4's. A tensor found in two or more files is stored once, in
  `shared.pt.xz` beside the registry, keyed by its content digest; a model file holds the
  string ``"shared:<digest>"`` in its place, and loading puts the tensor back after checking
  its digest.
* **Retired encoders.** Decoding reads h_s, g_s, the coding tables and the gains; only
  encoding reads g_a and h_a (which is 20–36% of a file). A model that a newer one supersedes
  can drop them: its entry is marked ``decode_only`` with the id that encodes instead, its
  streams decode exactly as before, and encoding with it is refused with a message that
  names the successor (`RetiredTransform`). (Not for a bits-back model: its decoder runs h_a.)
* **Gain tables from their trained rows.** A variable-rate file holds float32 gains for
  every one of its 257 rate points (0.25-0.43 MB after xz), but all but its 9 trained rows
  are interpolations that `codec.variable_rate.grid_from_trained_rows` reproduces from IEEE
  basic operations. A packed file keeps the trained rows, the bitwise difference of the
  table from that prediction (all zeros on the shipped models, so xz leaves nothing of it)
  and the table's digest, checked when it is put back (`compact_gains`, `expand_gains`).

A model's identity stays its `sha256` (the torch.save bytes it was exported as, what job
fingerprints hash): packing changes the file, not the model, so the entry records the packed
file's digest apart (`file_sha256`), and that is what loading checks.

    python -m codec.weight_store                          # re-pack the shipped registry
    python -m codec.weight_store --retire msh-vr=msh-vr4  # ... with msh-vr decode-only
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from codec.errors import ModelError
from codec.variable_rate import RATE_STEPS, grid_from_trained_rows

SHARED_FILE = "shared.pt.xz"
GAINS_FORM = "trained-rows+residual"  # a compacted "gains" entry (`compact_gains`)
BUDGET_BYTES = 40_000_000  # all shipped weights together: the model files and SHARED_FILE
REF = "shared:"
MIN_SHARED_BYTES = 4096  # smaller tensors are not worth a reference
ENCODER_PARTS = ("g_a", "h_a")


def digest(t: torch.Tensor) -> str:
    """Content digest of a tensor: dtype, shape and bytes (whatever its packing)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors(payload: dict, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in payload.items():
        if isinstance(v, dict):
            yield from _tensors(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


def resolve(payload: dict, folder: Path) -> dict:
    """`payload` (a model file's) with every shared reference replaced by its tensor and
    compacted gain tables expanded."""
    out = {}
    for k, v in payload.items():
        if isinstance(v, dict) and v.get("form") == GAINS_FORM:
            out[k] = expand_gains(resolve(v, folder))
        elif isinstance(v, dict):
            out[k] = resolve(v, folder)
        elif isinstance(v, str) and v.startswith(REF):
            out[k] = shared_tensor(folder, v[len(REF):])
        else:
            out[k] = v
    return out


def compact_gains(gains: dict[str, torch.Tensor]) -> dict:
    """A file's gain tables as their trained rows (every RATE_STEPS-th), the difference of
    each table's bits from `grid_from_trained_rows` (uint32 arithmetic modulo 2^32, stored
    as int32) and its digest."""
    out: dict = {"form": GAINS_FORM}
    for name, table in gains.items():
        t = table.detach().cpu().contiguous().numpy()
        trained = np.ascontiguousarray(t[::RATE_STEPS])
        if t.dtype != np.float32 or len(t) != (len(trained) - 1) * RATE_STEPS + 1:
            raise ModelError(f"gain table {name} is not a float32 table of a rate grid")
        residual = t.view(np.uint32) - grid_from_trained_rows(trained).view(np.uint32)
        out[name] = {"trained": torch.from_numpy(trained),
                     "residual": torch.from_numpy(residual.view(np.int32)),
                     "digest": digest(table)}
    return out


def expand_gains(packed: dict) -> dict[str, torch.Tensor]:
    """The gain tables `compact_gains` packed, each checked against its digest."""
    out = {}
    for name, part in packed.items():
        if name == "form":
            continue
        predicted = grid_from_trained_rows(part["trained"].numpy()).view(np.uint32)
        table = torch.from_numpy((predicted + part["residual"].numpy().view(np.uint32))
                                 .view(np.float32))
        if digest(table) != part["digest"]:
            raise ModelError(f"gain table {name} fails its integrity check; reinstall sgarc")
        out[name] = table
    return out


def shared_tensor(folder: Path, key: str) -> torch.Tensor:
    store = _store(folder.resolve())
    if key not in store:
        raise ModelError(f"shared weights {folder / SHARED_FILE} lack tensor {key[:12]}… that a "
                         "model file names; reinstall sgarc")
    return store[key]


@lru_cache(maxsize=4)
def _store(folder: Path) -> dict[str, torch.Tensor]:
    """The shared tensors of a weights folder, each checked against its digest (its name)."""
    path = folder / SHARED_FILE
    if not path.exists():
        raise ModelError(f"shared weights file {path} is missing; reinstall sgarc")
    try:
        store = torch.load(io.BytesIO(lzma.decompress(path.read_bytes())), map_location="cpu",
                           weights_only=True)
    except (lzma.LZMAError, RuntimeError, EOFError) as e:
        raise ModelError(f"shared weights file {path} fails its integrity check ({e}); "
                         "reinstall sgarc") from None
    for key, t in store.items():
        if digest(t) != key:
            raise ModelError(f"shared weights file {path} fails its integrity check (tensor "
                             f"{key[:12]}…); reinstall sgarc")
    return store


def _without_encoder(payload: dict) -> dict:
    """The payload less g_a and h_a (variable-rate files name them base.g_a, base.h_a)."""
    def encoder(key: str) -> bool:
        parts = key.split(".")
        return parts[0] in ENCODER_PARTS or parts[:2] in (["base", p] for p in ENCODER_PARTS)
    return {**payload, "state_dict": {k: v for k, v in payload["state_dict"].items()
                                      if not encoder(k)}}


def _with_refs(payload: dict, shared: set[str]) -> dict:
    out = {}
    for k, v in payload.items():
        if isinstance(v, dict):
            out[k] = _with_refs(v, shared)
        elif isinstance(v, torch.Tensor) and (d := digest(v)) in shared:
            out[k] = REF + d
        else:
            out[k] = v
    return out


def pack(registry: Path, retire: dict[str, str] | None = None) -> dict[str, int]:
    """Re-pack every model file of `registry`: tensors in two or more files go to the shared
    file; the models in `retire` (id -> the id that encodes instead) lose their encoder,
    models that named one of them as their successor name its successor instead, and a
    retired default hands the mark to its successor (the default must encode).
    Returns the bytes of each file written. Every model's tensors are read back and compared
    with what they were before anything is replaced."""
    from dataclasses import replace

    from codec.registry import entries, read_model_file, register, write_xz

    retire = dict(retire or {})
    known = {e.id: e for e in entries(registry)}
    for old, new in retire.items():
        if old not in known or new not in known:
            raise ModelError(f"retire {old}={new}: both must be registered models")
        if known[old].bits_back is not None:
            raise ModelError(f"{old} is a bits-back model: its decoder runs h_a, so its "
                             "encoder cannot be retired")
        if known[new].decode_only:
            raise ModelError(f"retire {old}={new}: {new} is decode-only itself")
    payloads, expected = {}, {}
    for e in known.values():
        payload = read_model_file(e, registry)
        expected[e.id] = _without_encoder(payload) if e.id in retire else payload
        payloads[e.id] = ({**expected[e.id], "gains": compact_gains(payload["gains"])}
                          if "gains" in payload else expected[e.id])
    candidates = {model_id: {digest(t): t for _, t in _tensors(p)
                             if t.numel() * t.element_size() >= MIN_SHARED_BYTES}
                  for model_id, p in payloads.items()}
    counts = Counter(d for found in candidates.values() for d in found)
    store = {d: t for found in candidates.values() for d, t in found.items() if counts[d] >= 2}
    shared, folder = set(store), registry.parent
    heirs = {retire[e.id] for e in known.values() if e.default and e.id in retire}
    write_xz(dict(sorted(store.items())), folder / SHARED_FILE)
    _store.cache_clear()
    for model_id, payload in payloads.items():
        e = known[model_id]
        successor = retire.get(model_id, e.decode_only)
        entry = replace(e, file_sha256=write_xz(_with_refs(payload, shared), folder / e.file),
                        decode_only=retire.get(successor, successor),
                        default=(e.default and model_id not in retire) or model_id in heirs)
        register(entry, registry)
        back = read_model_file(entry, registry)
        got, want = dict(_tensors(back)), dict(_tensors(expected[model_id]))
        if got.keys() != want.keys() or any(not torch.equal(got[k], t) or got[k].dtype != t.dtype
                                            for k, t in want.items()):
            raise ModelError(f"re-packing {model_id} changed its tensors; restore "
                             f"{folder} from git")
    return {name: (folder / name).stat().st_size
            for name in [SHARED_FILE, *(known[m].file for m in payloads)]}


def parse_retire(values: list[str]) -> dict[str, str]:
    """--retire OLD=NEW options as {OLD: NEW} (`pack`'s `retire`)."""
    pairs = [v.split("=", 1) for v in values]
    if any(len(p) != 2 for p in pairs):
        raise ModelError(f"--retire takes OLD=NEW, not {values}")
    return dict(pairs)


def weight_bytes(registry: Path) -> int:
    """Bytes of a registry's weights: its model files and the shared file."""
    from codec.registry import entries

    files = {e.file for e in entries(registry)} | {SHARED_FILE}
    return sum((registry.parent / f).stat().st_size for f in files
               if (registry.parent / f).exists())


def over_budget_message(total: int) -> str | None:
    """What to do when the weights outgrow BUDGET_BYTES (None: they fit)."""
    if total < BUDGET_BYTES:
        return None
    return (f"the weights are {total / 1e6:.2f} MB, over the {BUDGET_BYTES / 1e6:.0f} MB that "
            "all shipped weights must stay under: retire the encoder of the model the new one "
            "supersedes (--retire OLD=NEW), and train new models with --hyper-synthesis-of "
            "(they then share h_s, two thirds of a file, with that model: docs/codec.md)")


class RetiredTransform(nn.Sequential):
    """g_a or h_a of a decode-only model: its layers are there (rate folding reads their
    shapes) but its weights no longer ship, so running it is refused, never computed."""

    def __init__(self, *layers: nn.Module, model_id: str = "", successor: str = "") -> None:
        super().__init__(*layers)
        self.model_id, self.successor = model_id, successor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ModelError(retired_message(self.model_id or "this model", self.successor))


def retired_message(model_id: str, successor: str | None) -> str:
    instead = f"encode with {successor} instead" if successor else "encode with another model"
    return (f"model {model_id} is decode-only: its streams decode exactly as ever, but its "
            f"encoder no longer ships (a newer model supersedes it); {instead} "
            "(`sgarc models`)")


def check_encodable(entry) -> None:
    """Refuse a decode-only registry entry where encoding starts (a Codec, a job's settings,
    --init-from), with the message that names its successor."""
    if entry.decode_only:
        raise ModelError(retired_message(entry.id, entry.decode_only))


def retire_encoder(net: nn.Module, model_id: str, successor: str) -> None:
    """Mark a loaded model's g_a and h_a as retired (`RetiredTransform`)."""
    for name in ENCODER_PARTS:
        layers = getattr(net, name)
        setattr(net, name, RetiredTransform(*layers, model_id=model_id, successor=successor))


def main(argv: list[str] | None = None) -> int:
    from codec.registry import REGISTRY

    p = argparse.ArgumentParser(prog="python -m codec.weight_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", type=Path, default=REGISTRY)
    p.add_argument("--retire", action="append", default=[], metavar="OLD=NEW",
                   help="make model OLD decode-only; NEW is the model that encodes instead")
    args = p.parse_args(argv)
    try:
        retire = parse_retire(args.retire)
    except ModelError as e:
        p.error(str(e))
    before = sum(f.stat().st_size for f in args.registry.parent.glob("*.xz"))
    sizes = pack(args.registry, retire)
    for name, size in sorted(sizes.items()):
        print(f"{size / 1e6:8.3f} MB  {name}")
    print(f"{before / 1e6:8.3f} MB before, {sum(sizes.values()) / 1e6:.3f} MB now")
    message = over_budget_message(weight_bytes(args.registry))
    if message:
        print(message)
    return 1 if message else 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: codec.registry reads files
    # through codec.weight_store, whose cache of the shared file pack() must be the one it
    # clears (with two copies, a re-pack that changes the shared file read it stale).
    from codec.weight_store import main as imported_main
    raise SystemExit(imported_main())
