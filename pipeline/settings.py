"""What a recompression run does to each image, and its fingerprint.

Two images are "done the same way" when their source (key, size, version) and the run
fingerprint match: the fingerprint hashes every setting that changes the output bytes,
including the model file's sha256, so retraining a model under the same id still counts
as new work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from codec.images import DEFAULT_MAX_PIXELS
from codec.inference import DEFAULTS, InferenceConfig
from codec.metadata import META_VERSION, METADATA_POLICIES

_NOT_FINGERPRINTED = ("metadata",)  # see EncodeSettings.fingerprint
_OPTIONAL = ("rate", "target_psnr", "target_bpp", "min_psnr")
# settings amortized encoding ignores
ITERATIVE_ONLY = ("schedule", "patience", "eval_every", "min_improvement")


@dataclass(frozen=True)
class EncodeSettings:
    model: str | int | None = None  # id, quality level, or None for the default model
    method: str = "sga"
    iterations: int = DEFAULTS.iterations
    lr: float | None = None
    seed: int = 0
    schedule: str = DEFAULTS.schedule
    patience: int = DEFAULTS.patience
    alpha: str = "keep"
    depth: str = "error"
    max_pixels: int = DEFAULT_MAX_PIXELS
    metadata: str = "keep"  # oversized EXIF / ICC / XMP: refuse ("keep") or "drop-oversized"
    # variable-rate models: a rate point (grid index), or a per-image target (codec.targets)
    rate: int | None = None
    target_psnr: float | None = None
    target_bpp: float | None = None
    # the owner's policy (codec.routes): a PSNR floor; "never bigger than the source" is
    # always on
    min_psnr: float | None = None

    def policy(self):
        """The codec.routes.Policy every image of the run is stored under."""
        from codec.routes import Policy
        return Policy(self.min_psnr)

    def target(self):
        """The per-image codec.targets.Target, or None."""
        from codec.targets import Target
        if self.target_psnr is not None and self.target_bpp is not None:
            raise ValueError("give a PSNR target or a bpp target, not both")
        if self.target_psnr is not None:
            return Target("psnr", self.target_psnr)
        if self.target_bpp is not None:
            return Target("bpp", self.target_bpp)
        return None

    def inference(self) -> InferenceConfig:
        return InferenceConfig(method=self.method, iterations=self.iterations, lr=self.lr,
                               seed=self.seed, schedule=self.schedule, patience=self.patience,
                               eval_every=DEFAULTS.eval_every,
                               min_improvement=DEFAULTS.min_improvement)

    def resolved(self) -> dict:
        """Settings with the model resolved to its registry entry (id and sha256)."""
        from codec.registry import find, load_point

        entry = find(self.model)
        d = asdict(self)
        # Unset rate, target and floor keys are left out, so that fingerprints of runs from
        # before they existed stay the same; a variable-rate model's rate point is resolved.
        for key in _OPTIONAL:
            if d[key] is None:
                del d[key]
        target = self.target()
        if target is not None and not entry.variable_rate:
            raise ValueError(f"a PSNR or bpp target needs a variable-rate model; {entry.id} "
                             "is fixed-rate")
        if target is None and entry.variable_rate:
            d["rate"] = load_point(self.model, self.rate).rate
        elif self.rate is not None and not entry.variable_rate:
            raise ValueError(f"rate points need a variable-rate model; {entry.id} is "
                             "fixed-rate")
        # metadata_version: streams written before the META section existed carry no
        # metadata, so they do not count as done by a run that keeps it.
        d.update(model=entry.id, model_sha256=entry.sha256, quality=entry.quality,
                 lmbda=entry.lmbda, iterations=0 if self.method == "amortized" else
                 self.iterations, eval_every=DEFAULTS.eval_every,
                 min_improvement=DEFAULTS.min_improvement, metadata_version=META_VERSION)
        if self.method == "amortized":  # no iterations: amortized fingerprints stay as they were
            for key in ITERATIVE_ONLY:
                del d[key]
        self.inference()  # validates method and iterations
        self.policy()  # validates the floor
        if self.metadata not in METADATA_POLICIES:
            raise ValueError(f"metadata must be one of {METADATA_POLICIES}, not "
                             f"{self.metadata!r}")
        return d

    def fingerprint(self) -> str:
        """Hash of the settings that change an encoded image's bytes.

        The metadata policy is left out on purpose: it only decides whether an image with
        oversized metadata is refused or coded without that field, and every image coded
        under both policies gets the same bytes. So rerunning with
        ``metadata="drop-oversized"`` redoes only the images the first run refused.
        """
        settings = {k: v for k, v in self.resolved().items() if k not in _NOT_FINGERPRINTED}
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
