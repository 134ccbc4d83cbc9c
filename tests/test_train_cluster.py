"""`sgarc train --address`: data-parallel training through Ray Train, 2 CPU workers on the
session's local Ray, data from a folder and from S3 (moto), checkpoints that resume either
way, variable-rate fine-tuning and export."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from codec.api import Codec, decode
from codec.errors import SgarcError
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.registry import entries
from jobs.train import log_path, main
from pipeline.storage import Storage
from pipeline.train_cluster import decode_training_image, sample_images, worker_layout
from tests.conftest import smooth_image

TINY = ["--N", "8", "--M", "8", "--crop", "64", "--batch-size", "2", "--lr", "1e-3",
        "--lmbda", "0.01", "--log-every", "1", "--quiet"]
# importing ray.train sets Ray Data's deprecated context options
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
# The session's local Ray has 2 CPUs: each worker reserves 0.5 of one (pipeline.train_cluster).
CLUSTER = ["--address", "local", "--workers", "2", "--timeout", "300"]


def _png(seed: int, size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(size, size, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-cluster")
    for i in range(8):
        (folder / f"{i}.png").write_bytes(_png(i))
    return folder


@pytest.fixture(scope="module")
def s3():
    from tests.s3server import s3_server

    with s3_server() as server:
        yield server


def _log_records(ckpt):
    return [json.loads(line) for line in log_path(ckpt).read_text().splitlines()]


def test_two_workers_train_resume_exactly_and_hand_over_to_one_process(data, tmp_path,
                                                                       local_ray, capsys):
    common = ["--data", str(data), *TINY, "--checkpoint-every", "2", *CLUSTER]
    straight = tmp_path / "straight.ckpt"
    assert main([*common, "--checkpoint", str(straight), "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "2 CPU workers" in err and "training on 8 images of 8 sampled" in err
    state = torch.load(straight, weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2
    assert len(state["rng"]["workers"]) == 2  # every worker's crop stream, for an exact resume
    assert state["rng"]["workers"][0]["sampler"] != state["rng"]["workers"][1]["sampler"]
    records = _log_records(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["workers"] == 2 and np.isfinite(r["loss"]) for r in records)

    # a stopped run resumes on the cluster at the checkpoint's step, as if never stopped
    ckpt = tmp_path / "c.ckpt"
    assert main([*common, "--checkpoint", str(ckpt), "--steps", "2"]) == 0
    assert main([*common, "--checkpoint", str(ckpt), "--steps", "4"]) == 0
    assert f"resumed from {ckpt} at step 2" in capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4 and [r["step"] for r in _log_records(ckpt)] == [1, 2, 3, 4]
    ref = torch.load(straight, weights_only=True)["model"]
    for k, v in state["model"].items():
        assert torch.equal(v, ref[k]), k

    # the same checkpoint format: one process (no --address) goes on from it, and exports
    registry = tmp_path / "weights" / "registry.json"
    assert main(["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "5",
                 "--export", "tiny-dp", "--quality", "2", "--registry", str(registry)]) == 0
    assert f"resumed from {ckpt} at step 4" in capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 5 and state["world_size"] == 1
    (entry,) = entries(registry)
    assert (entry.id, entry.quality, entry.steps) == ("tiny-dp", 2, 5)


def test_s3_sample_fine_tunes_a_variable_rate_model_and_exports(data, tmp_path, s3, local_ray,
                                                                capsys):
    """--data s3://... --sample: the driver samples the listing, each worker reads its share;
    --init-from a fixed-rate checkpoint with --lmbdas trains one variable-rate model that
    exports (--export, temporary registry) and codes and decodes an image."""
    fixed = tmp_path / "fixed.ckpt"
    assert main(["--data", str(data), *TINY, "--checkpoint", str(fixed), "--steps", "1",
                 "--lmbda", "0.004"]) == 0
    bucket = s3.create_bucket()
    client = s3.client()
    for i in range(8):
        client.put_object(Bucket=bucket, Key=f"archive/2024/{i}.png", Body=_png(i))
    client.put_object(Bucket=bucket, Key="archive/2024/tiny.png", Body=_png(9, size=40))
    client.put_object(Bucket=bucket, Key="archive/notes.txt", Body=b"not an image")
    capsys.readouterr()

    registry = tmp_path / "weights" / "registry.json"
    ckpt = tmp_path / "vr.ckpt"
    args = ["--data", f"s3://{bucket}/archive", "--storage-options",
            json.dumps(s3.storage_options()), "--sample", "7", *TINY, "--checkpoint",
            str(ckpt), "--steps", "3", "--lmbdas", "0.002,0.004", "--init-from", str(fixed),
            *CLUSTER]
    assert main([*args, "--export", "tiny-vr-dp", "--registry", str(registry)]) == 0
    err = capsys.readouterr().err
    assert f"initialized from {fixed} (1 steps)" in err
    assert "7 of 9 images sampled" in err
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2 and state["init_steps"] == 1
    assert state["model"]["gain"].shape == (2, 8)  # two rate points, M = 8
    assert all(np.isfinite(r["loss"]) and r["workers"] == 2 for r in _log_records(ckpt))
    (entry,) = entries(registry)
    assert entry.id == "tiny-vr-dp" and entry.variable_rate and entry.steps == 1 + 3
    assert entry.data.startswith(f"s3://{bucket}/archive")

    image = load_image(data / "0.png")
    result = Codec("tiny-vr-dp", device="cpu", registry=registry, rate=0).encode(
        image, InferenceConfig(method="amortized"))
    assert result.rate == 0
    assert decode(result.data, registry=registry).rgb.shape == (96, 96, 3)


def test_a_worker_without_usable_images_is_a_one_line_error(tmp_path, local_ray, capsys):
    folder = tmp_path / "small"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(_png(i, size=40))
    assert main(["--data", str(folder), *TINY, "--checkpoint", str(tmp_path / "c.ckpt"),
                 "--steps", "2", *CLUSTER]) == 2
    err = capsys.readouterr().err
    assert "error: worker 0 has no training image of at least 64x64" in err
    assert "Traceback" not in err


def test_cluster_options_need_an_address(data, tmp_path, capsys):
    ckpt = str(tmp_path / "c.ckpt")
    assert main(["--data", "s3://bucket/photos", *TINY, "--checkpoint", ckpt]) == 2
    assert "a URL is read on a Ray cluster; add --address" in capsys.readouterr().err
    assert main(["--data", str(data), *TINY, "--checkpoint", ckpt, "--workers", "2"]) == 2
    assert "--workers: for training on a Ray cluster" in capsys.readouterr().err
    assert main(["--data", str(data), *TINY, "--checkpoint", ckpt, "--address", "local",
                 "--window", "32"]) == 2
    assert "--window 32 is smaller than --crop 64" in capsys.readouterr().err


def test_worker_layout():
    lay = worker_layout({"CPU": 2.0}, nodes=1, workers=2)  # this machine: half a CPU each
    assert (lay.workers, lay.use_gpu, lay.num_cpus, lay.threads) == (2, False, 0.5, 1)
    lay = worker_layout({"CPU": 64.0}, nodes=4)  # one worker per node, its CPUs as threads
    assert (lay.workers, lay.num_cpus, lay.threads) == (4, 1.0, 16)
    lay = worker_layout({"CPU": 32.0, "GPU": 4.0}, nodes=1)  # one per GPU
    assert (lay.workers, lay.use_gpu, lay.threads) == (4, True, 4)
    with pytest.raises(SgarcError, match="has 4 GPUs"):
        worker_layout({"CPU": 32.0, "GPU": 4.0}, nodes=1, workers=8)


def test_sample_is_deterministic_and_windows_bound_the_images(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(b"")
    storage = Storage(str(tmp_path))
    sample, listed = sample_images([storage], 4, seed=3)
    assert listed == 10 and len(sample) == 4 and sample == sorted(sample)
    assert sample == sample_images([storage], 4, seed=3)[0]
    assert sample != sample_images([storage], 4, seed=4)[0]
    assert sample_images([storage], 20, seed=3)[0] == [(0, f"{i}.png") for i in range(10)]

    big = Image.fromarray(smooth_image(300, 200))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    a = decode_training_image(buf.getvalue(), 64, 128, np.random.default_rng(0))
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert decode_training_image(buf.getvalue(), 64, 0, np.random.default_rng(0)).shape == \
        (300, 200, 3)
    assert decode_training_image(_png(0, size=40), 64, 128, np.random.default_rng(0)) is None
