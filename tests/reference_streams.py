"""Reference streams of the shipped models: written once, decoded by every test run.

Every shipped model id decodes for good (docs/bitstream.md), through any change of the code
or of the weight files' packing (codec.weight_store). `tests/data/reference_streams.json`
holds one small stream per shipped learned model (a synthetic 64x80 image, amortized; a
variable-rate model at two rate points) with the sha256 of its decoded pixels, written
before any of them was re-packed; test_registry decodes them all and compares.

    python -m tests.reference_streams   # add the streams of models not in the file yet
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

from PIL import Image

FILE = Path(__file__).parent / "data" / "reference_streams.json"


def pixels_sha256(rgb) -> str:
    return hashlib.sha256(rgb.tobytes()).hexdigest()


def main() -> int:
    from codec.api import Codec, decode
    from codec.images import load_image
    from codec.inference import InferenceConfig
    from codec.registry import entries
    from tests.conftest import smooth_image

    known = json.loads(FILE.read_text()) if FILE.exists() else []
    done = {r["model"] for r in known}
    buf = io.BytesIO()
    Image.fromarray(smooth_image(64, 80, seed=7)).save(buf, format="PNG")
    image = load_image(buf.getvalue(), name="reference.png")
    for e in entries():
        if e.id in done or e.bits_back is not None or e.decode_only:
            continue
        codec = Codec(e.id, device="cpu")
        rates = [None] if not e.variable_rate else [0, codec.lm.variable.max_rate_index]
        for rate in rates:
            c = codec if rate is None else codec.at_rate(rate)
            data = c.encode(image, InferenceConfig(method="amortized")).data
            known.append({"model": e.id, "rate": rate, "sha256_of_model": e.sha256,
                          "stream": base64.b64encode(data).decode(),
                          "pixels_sha256": pixels_sha256(decode(data).rgb)})
            print(e.id, rate, len(data), "bytes")
    FILE.parent.mkdir(exist_ok=True)
    FILE.write_text(json.dumps(known, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
