"""Shared fixtures: a tiny untrained model in a temporary registry, small synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from codec.model import MeanScaleHyperprior
from codec.registry import export_model

TINY_ID = "tiny-test"
RAY_ARGS = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False,
            "configure_logging": False}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions: one torch thread is far faster than several on a shared, busy CPU."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def _ray_shutdown_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_ray_shutdown_at_end) -> None:
    """An in-process Ray shared by the whole session, started on demand (a test that needs
    its own cluster may have shut the shared one down). Fractional CPUs: 2 on any machine."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init(**RAY_ARGS)


def _tiny_fixed_registry(folder: Path) -> Path:
    """folder/registry.json holding the small untrained fixed-rate model TINY_ID (seed 0)."""
    torch.manual_seed(0)
    registry = folder / "registry.json"
    export_model(MeanScaleHyperprior(N=16, M=24), TINY_ID, quality=1, lmbda=0.01, steps=0,
                 data="untrained (tests)", registry=registry)
    return registry


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """A registry with one small untrained model: fast, and weights don't matter for coding."""
    return _tiny_fixed_registry(tmp_path_factory.mktemp("weights"))


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([128 + 80 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)],
                    axis=-1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


TINY_VR_ID = "tiny-vr-test"
# The shipped variable-rate model the tests encode with where trained weights matter (the
# older ones are decode-only: codec.weight_store).
SHIPPED_VR_ID = "msh-vr6"


@pytest.fixture(scope="session")
def tiny_vr_registry(tmp_path_factory) -> Path:
    """A registry with a small untrained variable-rate model (3 λ points) beside a fixed one."""
    from codec.variable_rate import GainedMeanScaleHyperprior

    registry = _tiny_fixed_registry(tmp_path_factory.mktemp("vr-weights"))
    vr = GainedMeanScaleHyperprior(N=16, M=24, lmbdas=(0.002, 0.008, 0.032))
    vr.init_from_fixed(MeanScaleHyperprior(N=16, M=24), 2e-5)  # gains 10..40: latents code
    export_model(vr, TINY_VR_ID, quality=0, lmbda=0.0, steps=0, data="untrained (tests)",
                 registry=registry, half=True)
    return registry
