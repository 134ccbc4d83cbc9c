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
from codec.inference import InferenceConfig


@dataclass(frozen=True)
class EncodeSettings:
    model: str | int | None = None  # id, quality level, or None for the default model
    method: str = "sga"
    iterations: int = 2000
    lr: float | None = None
    seed: int = 0
    alpha: str = "keep"
    depth: str = "error"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def inference(self) -> InferenceConfig:
        return InferenceConfig(method=self.method, iterations=self.iterations, lr=self.lr,
                               seed=self.seed)

    def resolved(self) -> dict:
        """Settings with the model resolved to its registry entry (id and sha256)."""
        from codec.registry import find

        entry = find(self.model)
        d = asdict(self)
        d.update(model=entry.id, model_sha256=entry.sha256, quality=entry.quality,
                 lmbda=entry.lmbda, iterations=0 if self.method == "amortized" else
                 self.iterations)
        self.inference()  # validates method and iterations
        return d

    def fingerprint(self) -> str:
        canonical = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
