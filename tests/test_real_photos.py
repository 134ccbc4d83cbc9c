"""Rate accounting on real photos with the shipped model (scikit-image's bundled samples)."""

from __future__ import annotations

import pytest

from codec.api import Codec, decode
from codec.images import load_image
from codec.inference import InferenceConfig

skimage = pytest.importorskip("skimage")


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_coded_payload_is_within_half_a_percent_of_the_estimate(name):
    from jobs.demo import sample_photos

    codec = Codec(device="cpu")
    result = codec.encode(load_image(sample_photos()[name]), InferenceConfig(method="amortized"))
    assert abs(result.estimate_overhead) < 0.005, result.summary()
    decoded = decode(result.data)
    assert decoded.rgb.shape == (result.height, result.width, 3)
    assert result.psnr > 20
