"""What a recompression run does to each image, and its fingerprint.

:class:`EncodeSettings` is the one settings model of an encode: job specs (``[encode]`` and
``[policy]``) and the CLI's flags (``sgarc encode|run|refine``) are both generated from its
fields, and the fingerprint from their values. Adding an encode option is one
:func:`option` field here, with its description (the flag's help).

Two images are "done the same way" when their source (key, size, version) and the run
fingerprint match: the fingerprint hashes every setting that changes the output bytes,
including the model file's sha256, so retraining a model under the same id still counts
as new work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from codec.images import ALPHA_POLICIES, DEFAULT_MAX_PIXELS, DEPTH_POLICIES
from codec.inference import LAYOUT, METHODS, SCHEDULES, InferenceConfig
from codec.metadata import META_VERSION, METADATA_POLICIES

LIBRARY = InferenceConfig()  # the codec's defaults are the product's defaults

Method = Literal[METHODS]
IterativeMethod = Literal[tuple(m for m in METHODS if m != "amortized")]
Fingerprint = Literal["always", "when-set", "never"]


def option(default: Any, description: str, *, group: Literal["encode", "policy"] = "encode",
           fingerprint: Fingerprint = "when-set", iterative: bool = False,
           flags: tuple[str, ...] = (), metavar: str | None = None, **bounds: Any) -> Any:
    """A settings field with what the CLI, the spec and the fingerprint need to know.

    ``fingerprint``: "always" (in the fingerprint, as in every version so far), "when-set"
    (only when it differs from its default, so that adding an option never makes an archive
    redo its work) or "never" (it does not change the bytes). ``iterative``: amortized
    encoding ignores it (left out of amortized fingerprints). ``group``: the spec table
    ("encode" or "policy"). ``flags`` and ``metavar``: extra CLI spellings."""
    return Field(default, description=description, json_schema_extra={
        "group": group, "fingerprint": fingerprint, "iterative": iterative,
        "flags": list(flags), "metavar": metavar}, **bounds)


class EncodeSettings(BaseModel):
    """How every image of an encode is coded; validated when made (a ``ValueError``,
    pydantic's ``ValidationError``, names the field)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # The model: an id, or a quality level of the shipped zoo (None: the default model);
    # a variable-rate model's rate point (grid index), or a per-image target.
    quality: int | None = option(None, "quality level of a shipped model (see `sgarc "
                                 "models`); default: the middle level",
                                 fingerprint="always", flags=("-q",), ge=0)
    model: str | None = option(None, "model id instead of a quality level (see `sgarc "
                               "models`)", fingerprint="always", min_length=1)
    rate: int | None = option(None, "rate point of a variable-rate model: its grid index "
                              "(see `sgarc models`), finer than --quality", metavar="R", ge=0)
    target_psnr: float | None = option(
        None, "per image, the lowest rate point whose PSNR reaches DB (variable-rate model; "
        "searched on amortized encodings, then refined there)", metavar="DB", gt=0)
    target_bpp: float | None = option(
        None, "per image, the highest rate point within BPP bits per pixel", metavar="BPP",
        gt=0)
    # Inference (codec.inference): the defaults are the library's.
    method: Method = option(LIBRARY.method, "inference method (the others are the paper's "
                            "baseline and ablations)", fingerprint="always", flags=("-m",))
    iterations: int = option(LIBRARY.iterations, "iterations of iterative inference "
                             "(docs/performance.md says why this default)",
                             fingerprint="always", flags=("-n",), ge=0)
    lr: float | None = option(None, "Adam learning rate; default: 1e-2 with the scaled "
                              "schedule, 5e-3 with the paper's, 1e-4 for ste",
                              fingerprint="always", gt=0)
    seed: int = option(LIBRARY.seed, "seed of the stochastic rounding", fingerprint="always",
                       ge=0)
    schedule: Literal[SCHEDULES] = option(
        LIBRARY.schedule, "SGA temperature schedule: paper (t0=700, c=1e-3) or scaled (the "
        "paper's curve stretched onto --iterations)", fingerprint="always", iterative=True)
    patience: int = option(LIBRARY.patience, "stop an image early once its true RD loss "
                           f"improved by less than {LIBRARY.min_improvement:g} over this many "
                           "iterations (0 = off)", fingerprint="always", iterative=True, ge=0)
    # Images (codec.images)
    alpha: Literal[ALPHA_POLICIES] = option(
        "keep", "alpha channel: keep it losslessly, flatten onto white, or refuse the image",
        fingerprint="always")
    depth: Literal[DEPTH_POLICIES] = option("error", "16-bit images: refuse or reduce to 8 bits",
                                            fingerprint="always")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "decompression-bomb limit",
                             fingerprint="always", ge=1)
    # Not fingerprinted: it only decides whether an image with oversized metadata is refused
    # or coded without that field, and every image coded under both policies gets the same
    # bytes. So rerunning with "drop-oversized" redoes only the images the first run refused.
    metadata: Literal[METADATA_POLICIES] = option(
        "keep", "EXIF / ICC / XMP over sgarc's size limits: refuse the image (keep everything "
        "or nothing) or code it without the oversized field, recording the drop",
        fingerprint="never")
    # The owner's policy (codec.routes); "never bigger than the source" is always on.
    min_psnr: float | None = option(
        None, "quality floor: an image whose learned stream would be below DB is stored "
        "bit-exactly instead (JPEG XL transcode of a JPEG, else the original file); streams "
        "are never bigger than the source + 32 bytes", group="policy", metavar="DB", gt=0)

    @model_validator(mode="after")
    def check_exclusive(self) -> EncodeSettings:
        if self.model is not None and self.quality is not None:
            raise ValueError("give quality or model, not both")
        if self.target_psnr is not None and self.target_bpp is not None:
            raise ValueError("give target_psnr or target_bpp, not both")
        return self

    @property
    def model_ref(self) -> str | int | None:
        """What the registry looks up (codec.registry.find): the id, else the quality."""
        return self.model if self.model is not None else self.quality

    def policy(self):
        """The codec.routes.Policy every image of the run is stored under."""
        from codec.routes import Policy
        return Policy(self.min_psnr)

    def target(self):
        """The per-image codec.targets.Target, or None."""
        from codec.targets import Target
        if self.target_psnr is not None:
            return Target("psnr", self.target_psnr)
        if self.target_bpp is not None:
            return Target("bpp", self.target_bpp)
        return None

    def inference(self) -> InferenceConfig:
        """The codec's config: every field of it these settings have, the rest its own."""
        names = {f.name for f in fields(InferenceConfig)} & set(type(self).model_fields)
        return InferenceConfig(**{name: getattr(self, name) for name in names})

    def resolved(self) -> dict:
        """Settings with the model resolved to its registry entry (id and sha256): what the
        plan records and, less the "never" fields, what the fingerprint hashes."""
        from codec.registry import find, load_point

        entry = find(self.model_ref)
        from codec.weight_store import check_encodable
        check_encodable(entry)  # refused here, at submission, not once per image
        target = self.target()
        if target is not None and not entry.variable_rate:
            raise ValueError(f"a PSNR or bpp target needs a variable-rate model; {entry.id} "
                             "is fixed-rate")
        if self.rate is not None and not entry.variable_rate:
            raise ValueError(f"rate points need a variable-rate model; {entry.id} is "
                             "fixed-rate")
        rate = (load_point(self.model_ref, self.rate).rate
                if target is None and entry.variable_rate else None)
        self.inference()  # validates the codec's settings
        self.policy()  # validates the floor
        return self._resolved_as(entry, rate)

    def _resolved_as(self, entry, rate: int | None, layout: str = LAYOUT) -> dict:
        """`resolved` with the model `entry` at grid index `rate` (None: as set), coded in
        the latent `layout` (codec.inference.LAYOUT)."""
        amortized = self.method == "amortized"
        d = {}
        for name, info in type(self).model_fields.items():
            value, extra = getattr(self, name), info.json_schema_extra
            if extra["fingerprint"] == "when-set" and value == info.default:
                continue  # runs from before the option existed keep their fingerprint
            if not (amortized and extra["iterative"]):  # amortized fingerprints stay as
                d[name] = value                        # they were before iterations existed
        if rate is not None:
            d["rate"] = rate
        # metadata_version: streams written before the META section existed carry no
        # metadata, so they do not count as done by a run that keeps it.
        d.update(model=entry.id, model_sha256=entry.sha256, quality=entry.quality,
                 lmbda=entry.lmbda, iterations=0 if amortized else self.iterations,
                 metadata_version=META_VERSION)
        if not amortized:
            cfg = self.inference()
            d.update(eval_every=cfg.eval_every, min_improvement=cfg.min_improvement)
        if layout != "replicate":  # the first layout: fingerprints from before it had a name
            d["layout"] = layout
        return d

    def superseded_fingerprints(self) -> list[str]:
        """The fingerprints these settings had before the codec changed under them: in the
        older latent layout, and under the models their model supersedes.

        Why: a rerun of an unchanged spec must not re-encode an archive because the product
        improved (DESIGN.md decision 5: it redoes only what is missing). Streams in the
        replicate layout (before 2026-12-06's "tight" one) decode exactly as before and are
        only larger (docs/bitstream.md). A spec that names a quality level (or nothing)
        chose a level, not a model: when a new default model takes the levels over (the
        zoo's went to msh-vr5 on 2026-12-06) what its runs encoded with the superseded
        models (decode-only, naming the new one), in either layout, stays done too. A spec
        that names a model, a rate or a target chose it: only the layout applies.
        Re-encoding for the gain is a run into a new output."""
        from codec.registry import DEFAULT_QUALITY, entries, find

        current = find(self.model_ref)
        out = [self._fingerprint_of(self._resolved_as(
            current, self.resolved().get("rate"), "replicate"))]
        if self.model is not None or self.rate is not None or self.target() is not None:
            return out
        level = DEFAULT_QUALITY if self.quality is None else self.quality
        for e in entries():
            if e.decode_only != current.id:
                continue
            if e.variable_rate:
                rate = e.quality_rate(level)  # from the entry: no weights loaded
            elif e.quality == level:
                rate = None
            else:
                continue
            out += [self._fingerprint_of(self._resolved_as(e, rate, layout))
                    for layout in ("replicate", LAYOUT)]
        return out

    def fingerprint(self) -> str:
        """Hash of the settings that change an encoded image's bytes (not the "never"
        fields, such as the metadata policy)."""
        return self._fingerprint_of(self.resolved())

    def _fingerprint_of(self, resolved: dict) -> str:
        never = {name for name, info in type(self).model_fields.items()
                 if info.json_schema_extra["fingerprint"] == "never"}
        settings = {k: v for k, v in resolved.items() if k not in never}
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> EncodeSettings:
        """A copy with ``changes``, validated like any other."""
        return type(self).model_validate({**self.model_dump(), **changes})
