"""Training: minimize R + lmbda * 255^2 * MSE with the uniform-noise relaxation (paper Eq. 3, S2).

R is in bits per pixel; MSE is on [0, 1] pixels. Random crops with flips are drawn from image
folders loaded once into memory. Checkpoints hold model, optimizer and step, so a run that is
stopped resumes where it left off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from codec.entropy_models import gaussian_likelihood
from codec.model import MeanScaleHyperprior
from codec.variable_rate import (
    FINE_TUNE_PARTS,
    RATE_STEPS,
    GainedMeanScaleHyperprior,
    split_channels,
    split_parameters,
    widen,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class TrainConfig:
    data: list[str]
    lmbda: float = 0.0067
    N: int = 128
    M: int = 192
    steps: int = 100_000
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-4
    lr_drop_at: float = 0.9  # fraction of steps (or of the time budget) where the cooldown starts
    # The cooldown's shape (`learning_rate`): "step" = lr / 10 from lr_drop_at on; "linear"
    # and "sqrt" = down to 0 at the end, as 1 - t or 1 - sqrt(t) of the cooldown's fraction t
    # (warmup-stable-decay: Hägele et al. 2024 found 1 - sqrt the best of these shapes).
    lr_cooldown: str = "step"
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 500
    # Start a new run from these weights (a registry id or a checkpoint file) instead of at
    # random: fine-tuning a neighbouring quality level reaches a good model in a fraction
    # of the steps. Ignored when resuming, since the checkpoint already holds the weights.
    init_from: str | None = None
    # Variable-rate training (codec.variable_rate): the λ points, one drawn per crop; empty =
    # one fixed-rate model at `lmbda`. With --init-from a fixed-rate model, that model's λ
    # sets the gains' start (GainedMeanScaleHyperprior.init_from_fixed).
    lmbdas: tuple[float, ...] = ()
    gain_lr_scale: float = 10.0  # the gains learn this much faster than the transforms
    # Speed (bench/train_step.py): channels_last activations (same math, oneDNN's fast
    # path); bf16 autocast of the hidden layers (variable-rate models; float32 heads).
    channels_last: bool = True
    bf16: bool = False
    # Stop (with a checkpoint) after this many seconds of this call, even before `steps`:
    # the GPU session's time box (wall clock), fixed-budget studies (bench/train_study.py:
    # CPU seconds of this process, which other load on the machine does not shrink).
    time_budget: float | None = None
    budget_clock: str = "wall"  # "wall" or "cpu"
    # Once, at the start of this call: split every latent channel that carries no bits at
    # the top λ from a live one (revive_dead_channels); variable-rate models.
    revive_dead_channels: bool = False
    # Variable-rate: draw each crop's rate from every grid point (RATE_STEPS per λ
    # interval, gains and λ interpolated as the exported tables are) rather than from the
    # trained points only, so that the points in between are trained too (docs/codec.md,
    # "Rate points between the trained ones").
    rate_grid: bool = False
    # Variable-rate: weight each crop's loss by (λ_r / λ_0)^-p, normalized to mean 1 over
    # the rate grid. p = 0 is the plain sum, where the top rates dominate the shared
    # transforms' gradient (their losses are ~25x the lowest point's, measured on msh-vr4):
    # the low end then trails; p about 0.6 gives every rate point a comparable share, as
    # BD-rate counts them (docs/results.md, "Low-rate weighting").
    rate_weight_power: float = 0.0
    # A shipped model id whose h_s this run uses, fixed (loaded at the start of every call,
    # never trained: `fix_hyper_synthesis`). Its export then holds the very tensors of that
    # model's h_s, which codec.weight_store stores once for both files: h_s is two thirds of
    # an N=64 / M=192 model (2.7 M of 4.1 M parameters), so a model that shares it fits in
    # the 40 MB that all shipped weights must stay under, and one with its own does not.
    hyper_synthesis_of: str | None = None
    # Variable-rate fine-tunes on the latents as coding rounds them, one side of the coder
    # at a time (`fix_all_but`, GainedMeanScaleHyperprior._hard_forward). "synthesis": g_s
    # and the inverse gains, the second phase of Guo et al. 2021 ("Soft then Hard"): the
    # noise-trained synthesis never saw the rounded latents it decodes. "analysis": g_a,
    # h_a and the hyper gains, against that fixed decoder (straight-through rounding into
    # it, the noisy rate: Minnen & Singh 2020's "mixed" quantization). The rest stays as
    # --init-from has it, so an export shares it with that model (codec.weight_store).
    fine_tune: str | None = None

    @property
    def variable_rate(self) -> bool:
        return bool(self.lmbdas)


LR_COOLDOWNS = ("step", "linear", "sqrt")


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """The learning rate at `progress` (0 … 1) through the run: cfg.lr, then the cooldown."""
    if progress < cfg.lr_drop_at:
        return cfg.lr
    if cfg.lr_cooldown == "step":
        return cfg.lr * 0.1
    t = min(1.0, (progress - cfg.lr_drop_at) / max(1.0 - cfg.lr_drop_at, 1e-12))
    if cfg.lr_cooldown == "linear":
        return cfg.lr * (1.0 - t)
    if cfg.lr_cooldown == "sqrt":
        return cfg.lr * (1.0 - math.sqrt(t))
    raise ValueError(f"lr_cooldown {cfg.lr_cooldown!r}: expected one of {LR_COOLDOWNS}")


def initial_weights(init_from: str) -> tuple[dict[str, torch.Tensor], int, float | None]:
    """The float state dict, the steps it was trained for and its λ (None: a variable-rate
    model or an unknown one), from a checkpoint or model id."""
    from codec import registry
    if Path(init_from).is_file():
        state = torch.load(init_from, map_location="cpu", weights_only=True)
        config = state.get("config", {})
        lmbda = None if config.get("lmbdas") else config.get("lmbda")
        return state["model"], int(state["step"]) + int(state.get("init_steps", 0)), lmbda
    loaded = registry.load(init_from)  # ModelError names the known ids
    from codec.weight_store import check_encodable
    check_encodable(loaded.entry)  # its g_a and h_a are not shipped: nothing to start from
    net = loaded.variable if loaded.variable is not None else loaded.model
    return (net.state_dict(), loaded.entry.steps,
            None if loaded.variable is not None else loaded.entry.lmbda)


def fix_hyper_synthesis(model: nn.Module, cfg: TrainConfig) -> None:
    """Put model `cfg.hyper_synthesis_of`'s h_s into `model` and keep it out of training
    (requires_grad off: Adam skips it, the optimizer's groups and checkpoints are unchanged).
    Run before any DistributedDataParallel wrapping; a no-op without the setting."""
    if not cfg.hyper_synthesis_of:
        return
    if cfg.revive_dead_channels:
        raise ValueError("--revive-dead-channels rewrites h_s's last layer, which "
                         "--hyper-synthesis-of keeps fixed: use one or the other")
    from codec import registry
    loaded = registry.load(cfg.hyper_synthesis_of)  # ModelError names the known ids
    source = loaded.variable.base if loaded.variable is not None else loaded.model
    base = model.base if isinstance(model, GainedMeanScaleHyperprior) else model
    try:
        base.h_s.load_state_dict(source.h_s.state_dict())
    except RuntimeError:
        raise ValueError(f"--hyper-synthesis-of {cfg.hyper_synthesis_of}: its h_s is of "
                         f"N={source.N}, M={source.M}, not N={cfg.N}, M={cfg.M}") from None
    base.h_s.requires_grad_(False)


def fix_all_but(model: nn.Module, cfg: TrainConfig) -> None:
    """With cfg.fine_tune, keep every parameter but that side's (FINE_TUNE_PARTS) out of
    training (requires_grad off, as `fix_hyper_synthesis` does); else a no-op."""
    if cfg.fine_tune is None:
        return
    if cfg.fine_tune not in FINE_TUNE_PARTS:
        raise ValueError(f"fine_tune {cfg.fine_tune!r}: expected one of "
                         f"{tuple(FINE_TUNE_PARTS)}")
    if not isinstance(model, GainedMeanScaleHyperprior):
        raise ValueError("--fine-tune trains a variable-rate model (--lmbdas)")
    parts = FINE_TUNE_PARTS[cfg.fine_tune]
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == k or name.startswith(k) for k in parts))


def build_model(cfg: TrainConfig) -> nn.Module:
    if cfg.variable_rate:
        return GainedMeanScaleHyperprior(cfg.N, cfg.M, cfg.lmbdas)
    return MeanScaleHyperprior(cfg.N, cfg.M)


def load_initial(model: nn.Module, init_from: str, cfg: TrainConfig) -> int:
    """Load --init-from weights into a new model; returns the steps behind them. A
    variable-rate model narrower than cfg.M is widened first (codec.variable_rate.widen)."""
    weights, steps, lmbda = initial_weights(init_from)
    fixed_into_variable = cfg.variable_rate and not any(k.startswith("base.") for k in weights)
    try:
        if fixed_into_variable:
            fixed = MeanScaleHyperprior(cfg.N, cfg.M)
            fixed.load_state_dict(weights)
            model.init_from_fixed(fixed, lmbda if lmbda is not None else cfg.lmbda)
        elif cfg.variable_rate and latent_width(weights) < cfg.M:
            narrow = GainedMeanScaleHyperprior(cfg.N, latent_width(weights), cfg.lmbdas)
            narrow.load_state_dict(weights)
            model.load_state_dict(widen(narrow, cfg.M, cfg.seed).state_dict())
        else:
            model.load_state_dict(weights)
    except RuntimeError:
        raise ValueError(f"--init-from {init_from}: its N, M or rate points differ from "
                         f"N={cfg.N}, M={cfg.M}") from None
    return steps


@torch.no_grad()
def channel_bits(model: GainedMeanScaleHyperprior, x: torch.Tensor, rate: int) -> torch.Tensor:
    """Bits per pixel that each latent channel costs at trained λ point `rate` on images x
    (hard rounding around mu, the coded rate)."""
    was_training = model.training
    model.eval()
    b, g = model.base, model.gains(torch.full((x.shape[0],), rate, device=x.device))
    y = b.g_a(x)
    z_hat = torch.round(b.h_a(y) * g["hyper_gain"])
    sigma, mu = b.h_s(z_hat * g["hyper_inverse_gain"]).chunk(2, dim=1)
    mu, sigma, y = mu * g["gain"], sigma * g["gain"], y * g["gain"]
    bits = -torch.log2(gaussian_likelihood(torch.round(y - mu) + mu, mu, sigma))
    model.train(was_training)
    return bits.sum(dim=(0, 2, 3)) / (x.shape[0] * x.shape[2] * x.shape[3])


def revive_dead_channels(model: GainedMeanScaleHyperprior, opt: torch.optim.Optimizer,
                         x: torch.Tensor, share: float = 0.01) -> list[int]:
    """Split each latent channel that costs under `share` of the mean channel's bits at the
    top λ (on images x) from a live one, the costliest first (split_channels), and drop the
    optimizer's state for the tensors that changed (Adam starts them afresh). Returns the
    revived channels. Why: a channel that fell below the quantization step gets almost no
    gradient and stays unused (docs/results.md, msh-vr3)."""
    bits = channel_bits(model, x, model.num_rates - 1).cpu()
    dead = [int(c) for c in torch.nonzero(bits < share * bits.mean()).flatten()]
    live = [int(c) for c in torch.argsort(bits, descending=True) if int(c) not in dead]
    if not dead or not live:
        return []
    split_channels(model, dead, [live[i % len(live)] for i in range(len(dead))])
    for p in split_parameters(model):
        opt.state.pop(p, None)
    return dead


def latent_width(weights: dict[str, torch.Tensor]) -> int:
    """M of a (variable-rate or fixed) state dict: g_a's last layer's outputs."""
    key = next(k for k in weights if k.endswith("g_a.6.weight"))
    return weights[key].shape[0]


def rd_loss_terms(x: torch.Tensor, out: dict, lmbda: float | torch.Tensor,
                  weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Batch means of R + λ·255²·MSE, R and MSE; `lmbda` is a number or one λ per crop,
    `weight` (optional) one loss weight per crop (rate_weights)."""
    pixels = x.shape[2] * x.shape[3]
    bits = sum(-torch.log2(lik).sum(dim=(1, 2, 3)) for lik in out["likelihoods"].values())
    bpp = bits / pixels
    mse = torch.mean((out["x_hat"] - x) ** 2, dim=(1, 2, 3))
    loss = bpp + lmbda * 255.0**2 * mse
    if weight is not None:
        loss = loss * weight
    return {"loss": loss.mean(), "bpp": bpp.mean(), "mse": mse.mean()}


def rate_weights(net: GainedMeanScaleHyperprior, r: torch.Tensor, power: float
                 ) -> torch.Tensor:
    """Loss weights (λ_r / λ_0)^-power at rate positions r, normalized to mean 1 over the
    whole rate grid (TrainConfig.rate_weight_power)."""
    grid = torch.arange(net.max_rate_index + 1, device=r.device).float() / RATE_STEPS
    lmbda0 = net.lmbdas[0]
    norm = (net.lmbda_at(grid) / lmbda0).pow(-power).mean()
    return (net.lmbda_at(r) / lmbda0).pow(-power) / norm


def compact_checkpoint(checkpoint: Path) -> None:
    """Rewrite a checkpoint as the resume point the repository keeps (training/): the
    model's float weights in float16 and no Adam moments, a quarter of the bytes.

    Why: the whole tracked tree travels to a lent GPU, which takes 64 MiB in all
    (scripts/gpu_session.sh); with M=192 the full checkpoint is 49 MB and even bfloat16
    moments left 33 MB. The float16 rounding (relative 2^-11) is below one step's update at
    the stable learning rate, and the exports are float16 anyway; the moments are rebuilt
    on resume, under a short learning-rate warm-up (`REWARM_STEPS`), since a fresh Adam's
    first updates are lr-sized for every weight. Checkpoints written during a session keep
    everything; only the one committed at its end is compacted."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["optimizer"]["state"] = {}
    state["model"] = {k: (v.half() if v.is_floating_point() else v).contiguous()
                      for k, v in state["model"].items()}
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(checkpoint)


REWARM_STEPS = 250  # lr ramp after resuming without Adam's moments (compact_checkpoint)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Adam groups: the gains of a variable-rate model learn `gain_lr_scale` times faster."""
    if not cfg.variable_rate:
        return [{"params": list(model.parameters())}]
    gains = [p for n, p in model.named_parameters() if not n.startswith("base.")]
    base = [p for n, p in model.named_parameters() if n.startswith("base.")]
    return [{"params": base}, {"params": gains, "lr_scale": cfg.gain_lr_scale}]


def image_files(folders: Iterable[str | Path]) -> list[Path]:
    files = []
    for folder in folders:
        files += [p for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    return files


def load_training_images(files: list[Path], crop: int) -> list[np.ndarray]:
    """The images (uint8 RGB) of at least crop x crop pixels."""
    images = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if min(a.shape[:2]) >= crop:
            images.append(a)
    if not images:
        raise ValueError(f"no training image of at least {crop}x{crop} in {len(files)} files")
    return images


def make_sampler(files: list[Path], crop: int, seed: int, device: torch.device):
    """On CUDA, images of one size (the GPU session's pack) go to the GPU once
    (DeviceCropSampler); otherwise crops are cut on the host (CropSampler)."""
    return sampler_for(load_training_images(files, crop), crop, seed, device)


class CropSampler:
    """Random crops with horizontal/vertical flips from images held in memory as uint8."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int) -> None:
        self.images = images
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def get_state(self):
        return self.rng.bit_generator.state

    def set_state(self, state) -> None:
        """Resume the crop stream (a GPU run's state, a tensor, does not apply here)."""
        if isinstance(state, dict):
            self.rng.bit_generator.state = state

    def batch(self, n: int) -> torch.Tensor:
        out = np.empty((n, self.crop, self.crop, 3), np.uint8)
        for i in range(n):
            a = self.images[self.rng.integers(len(self.images))]
            r = self.rng.integers(a.shape[0] - self.crop + 1)
            c = self.rng.integers(a.shape[1] - self.crop + 1)
            a = a[r:r + self.crop, c:c + self.crop]
            if self.rng.random() < 0.5:
                a = a[:, ::-1]
            if self.rng.random() < 0.5:
                a = a[::-1]
            out[i] = a
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)

    def rate_points(self, n: int, num_rates: int) -> torch.Tensor:
        """One trained rate point per crop, uniformly (variable-rate training)."""
        return torch.from_numpy(self.rng.integers(num_rates, size=n))


class DeviceCropSampler:
    """CropSampler's crops and flips, cut on the device from one uint8 tensor of same-size
    images: no host work and no transfer per step (a GPU would otherwise wait on them)."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int,
                 device: torch.device) -> None:
        self.images = torch.from_numpy(np.stack(images)).to(device)  # (n, H, W, 3)
        self.crop, self.device = crop, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.offsets = torch.arange(crop, device=device)

    def get_state(self):
        return self.gen.get_state()

    def set_state(self, state) -> None:
        """Resume the crop stream (a host run's state, a dict, does not apply here)."""
        if torch.is_tensor(state):
            self.gen.set_state(state.cpu())

    def _ints(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=self.gen, device=self.device)

    def batch(self, n: int) -> torch.Tensor:
        count, H, W, _ = self.images.shape
        i, r, c = self._ints(count, n), self._ints(H - self.crop + 1, n), \
            self._ints(W - self.crop + 1, n)
        rows = (r[:, None] + self.offsets)[:, :, None]
        cols = (c[:, None] + self.offsets)[:, None, :]
        flip_h, flip_v = self._ints(2, n).bool(), self._ints(2, n).bool()
        cols = torch.where(flip_h[:, None, None], cols.flip(2), cols)
        rows = torch.where(flip_v[:, None, None], rows.flip(1), rows)
        x = self.images[i[:, None, None], rows, cols]  # (n, crop, crop, 3)
        return x.permute(0, 3, 1, 2).float().div_(255.0)

    def rate_points(self, n: int, num_rates: int) -> torch.Tensor:
        return self._ints(num_rates, n)


def sampler_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of the crop stream of a run (re)started at `step` without saved random
    states: worker `rank` of a data-parallel run (rank 0: also a single process's)."""
    return seed + step + rank * 2**32


def sampler_for(images: list[np.ndarray], crop: int, seed: int, device: torch.device):
    """make_sampler's choice for images already in memory."""
    if device.type == "cuda" and len({a.shape for a in images}) == 1:
        return DeviceCropSampler(images, crop, seed, device)
    return CropSampler(images, crop, seed)


def memory_format_of(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def load_checkpoint(checkpoint: Path, cfg: TrainConfig, device: torch.device | str
                    ) -> dict | None:
    """The saved state to resume from (None: no checkpoint yet). A checkpoint trained with
    another N, M or λ is refused (ValueError)."""
    if not checkpoint.exists():
        return None
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    saved = state.get("config", {})
    saved.setdefault("lmbdas", ())
    changed = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in ("N", "M", "lmbda", "lmbdas")
               if k in saved and tuple(np.atleast_1d(saved[k])) !=
               tuple(np.atleast_1d(getattr(cfg, k)))]
    if changed:
        raise ValueError(f"checkpoint {checkpoint} was trained with other settings "
                         f"({', '.join(changed)}); use another checkpoint path")
    return state


def restore(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> tuple[int, int]:
    """Load a checkpoint's model and optimizer; returns (step, steps behind --init-from)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), int(state.get("init_steps", 0))


def rng_state(sampler, device: torch.device) -> dict:
    """This process's random states: torch (CPU, CUDA) and the crop sampler's."""
    return {"torch": torch.get_rng_state(), "sampler": sampler.get_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def set_rng_state(rng: dict, sampler, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    sampler.set_state(rng["sampler"])


def checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer, step: int, init_steps: int,
                     cfg: TrainConfig, rng: dict, world_size: int = 1) -> dict:
    """The checkpoint format (one for a single process and a data-parallel run): model,
    optimizer, step, init_steps, config, rng (rank 0's; a data-parallel run adds every
    worker's under rng["workers"]) and world_size (workers that trained the last steps;
    each drew batch_size crops per step)."""
    return {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
            "step": step, "init_steps": init_steps, "config": asdict(cfg), "rng": rng,
            "world_size": world_size}


def save_checkpoint(checkpoint: Path, state: dict) -> None:
    """Write a checkpoint atomically (a temp file beside it, then a rename)."""
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(checkpoint)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sampler, cfg: TrainConfig,
               lr: float, device: torch.device) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch of `batch_size` crops (per worker, for a DDP model,
    whose backward averages the gradients over the workers); returns rd_loss_terms."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    x = sampler.batch(cfg.batch_size).to(device, memory_format=memory_format_of(cfg))
    if cfg.variable_rate:
        net = unwrap(model)
        if cfg.rate_grid:  # any grid point, as a float position between trained points
            index = sampler.rate_points(cfg.batch_size, net.max_rate_index + 1).to(device)
            r = index.float() / RATE_STEPS
        else:
            r = sampler.rate_points(cfg.batch_size, len(cfg.lmbdas)).to(device)
        weight = rate_weights(net, r, cfg.rate_weight_power) if cfg.rate_weight_power else None
        terms = rd_loss_terms(x, model(x, r, bf16=cfg.bf16, hard=cfg.fine_tune),
                              net.lmbda_at(r), weight)
    else:
        terms = rd_loss_terms(x, model(x), cfg.lmbda)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return terms


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, sampler, cfg: TrainConfig,
              step: int, device: torch.device, save: Callable[[int], None], log=print,
              on_record: Callable[[dict], None] | None = None,
              agree: Callable[[float], float] | None = None,
              mean_over_workers: Callable[[dict], dict] | None = None,
              rewarm_from: int | None = None) -> int:
    """The training loop from `step` to cfg.steps (or the time budget); returns the step
    reached. `save(step)` is called every checkpoint_every steps, at the end and when the
    time budget is spent. A data-parallel run passes `agree` (rank 0's value of a number,
    here the elapsed time, so every worker drops the lr and stops at the same step) and
    `mean_over_workers` (the logged means over all workers' crops). `rewarm_from`: the
    step Adam's moments restarted at; the lr ramps up over REWARM_STEPS from there."""
    model.train()
    t0, acc, n = time.time(), {"loss": 0.0, "bpp": 0.0, "mse": 0.0}, 0
    clock = time.process_time if cfg.budget_clock == "cpu" else time.time
    started = clock()
    while step < cfg.steps:
        elapsed = 0.0
        if cfg.time_budget is not None:
            elapsed = clock() - started
            if agree is not None:
                elapsed = agree(elapsed)
            if elapsed > cfg.time_budget:
                log(f"time budget of {cfg.time_budget:g} s spent at step {step}")
                save(step)
                break
        # progress through the run: by steps, or by the time box when that ends it first
        progress = step / cfg.steps
        if cfg.time_budget:
            progress = max(progress, elapsed / cfg.time_budget)
        lr = learning_rate(cfg, progress)
        if rewarm_from is not None:
            lr *= min(1.0, (step - rewarm_from + 1) / REWARM_STEPS)
        terms = train_step(model, opt, sampler, cfg, lr, device)
        step, n = step + 1, n + 1
        for k in acc:
            acc[k] += terms[k].item()
        if step % cfg.log_every == 0 or step == cfg.steps:
            means = {k: v / n for k, v in acc.items()}
            if mean_over_workers is not None:
                means = mean_over_workers(means)
            psnr = -10 * math.log10(max(means["mse"], 1e-12))
            seconds = (time.time() - t0) / n
            log(f"step {step} loss {means['loss']:.4f} bpp {means['bpp']:.4f} "
                f"psnr {psnr:.2f} lr {lr:g} {seconds:.3f}s/step")
            if on_record is not None:
                on_record({"step": step, **means, "psnr": psnr, "lr": lr,
                           "seconds_per_step": seconds})
            t0, acc, n = time.time(), dict.fromkeys(acc, 0.0), 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step)
    return step


def train(cfg: TrainConfig, checkpoint: Path, log=print,
          on_record: Callable[[dict], None] | None = None) -> MeanScaleHyperprior:
    """Train (or resume from `checkpoint`) and return the float model.

    Every `log_every` steps the means over those steps go to `log` as a line and, as a dict
    (step, loss, bpp, mse, psnr, lr, seconds_per_step), to `on_record`. A checkpoint holds
    the model, the optimizer, the step and the random states (torch and crop sampler), so
    a resumed run draws the same crops and noise as one that was never stopped. Resuming
    with a different N, M or lambda than the checkpoint's is refused (ValueError).
    pipeline/train_cluster.py runs the same steps data-parallel on a Ray cluster.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device).to(memory_format=memory_format_of(cfg))
    state = load_checkpoint(checkpoint, cfg, device)
    step, init_steps = 0, 0
    if state is None and cfg.init_from:
        init_steps = load_initial(model, cfg.init_from, cfg)
        log(f"initialized from {cfg.init_from} ({init_steps} steps)")
    opt = torch.optim.Adam(param_groups(model, cfg), lr=cfg.lr)
    rewarm_from = None
    if state is not None:
        step, init_steps = restore(model, opt, state)
        log(f"resumed from {checkpoint} at step {step}")
        if not state["optimizer"]["state"]:
            rewarm_from = step
            log(f"no optimizer moments in it (a compacted resume point): lr warms up over "
                f"{REWARM_STEPS} steps")
    fix_hyper_synthesis(model, cfg)
    fix_all_but(model, cfg)
    sampler = make_sampler(image_files(cfg.data), cfg.crop, sampler_seed(cfg.seed, step), device)
    if state is not None and "rng" in state:
        set_rng_state(state["rng"], sampler, device)
    log(f"training on {len(sampler.images)} images, device {device}, config {asdict(cfg)}")
    if cfg.revive_dead_channels:
        revived = revive_dead_channels(unwrap(model), opt, sampler.batch(16).to(device))
        log(f"revived {len(revived)} dead latent channels by splitting live ones: {revived}")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        save_checkpoint(checkpoint, checkpoint_state(model, opt, step, init_steps, cfg,
                                                     rng_state(sampler, device)))

    run_steps(model, opt, sampler, cfg, step, device, save, log, on_record,
              rewarm_from=rewarm_from)
    return model
