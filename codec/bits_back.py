"""Lossy bits-back coding: the paper's SGA+BB (section 3.3, Algorithm 1; S2, S3). Experimental.

Side information xi (any bytes) rides in the *choice* of the hyper-latents z_hat: the
encoder decodes z_hat from xi with an entropy model Q(z_hat | mu_z, sigma_z), then codes
z_hat with P(z_hat) and y_hat with P(y_hat | z_hat) as usual. The decoder decodes z_hat and
y_hat, gets the image without anything else, and, when asked, re-derives Q from y_hat alone
(reproducible BBVI: fixed seed, fixed steps) and encodes z_hat with it, which gives xi back.
xi costs the file about -log2 Q(z_hat) bits less than its length: the net rate is
file bits - side-information bits.

The model (S2): the hyper-inference network outputs a mean and a log-std of a Gaussian
q(z | y); p(z) is the flexible density itself (not convolved with a uniform); training
minimizes the NELBO, whose rate is the net rate (bits of y and z minus the entropy of q).

How it fits sgarc's exact coding (docs/bitstream.md, version 4):

* z_hat lies on a grid of step 2^-Z_GRID_BITS (not the integers), so Q can be narrow and
  P(z_hat) is the density's mass on each grid bin; the exact integer hyper-synthesis takes
  grid indices as fixed point (codec.frozen, `z_frac_bits`), so mu and the scale index stay
  bit-exact on every device.
* y_hat lies on the integers (not mu + k as in the other models: z_hat is chosen after y_hat
  here). Its tables are the discretized Gaussian of the scale index, shifted by the mean's
  fractional part rounded to 1/16: 128 x 17 tables made at load (scipy's ndtr, float64,
  rounded to 2^-40) and checked against a digest stored at export, so a machine that would
  compute them differently refuses the model instead of decoding wrongly.
* Q's parameters are rounded to 2^-8 grid steps; the header carries the BBVI step count and
  a CRC of those parameters, and xi is framed with its length and CRC-32. Reproducing the
  decoder's BBVI exactly is what recovery needs: it always runs on the CPU with one thread
  (whatever device encoded), so it does not depend on the thread count or the encoding
  device; where it does not reproduce (another CPU family or torch build), the digest
  differs and recovery is refused with a clear error. The image decodes regardless.

Methods: `sga-bb` [M2] (joint SGA over y_hat and BBVI over (mu_z, sigma_z), then
reproducible BBVI), `bb-no-sga` [A5] (amortized y_hat, reproducible BBVI) and `bb-amortized`
[A6] (amortized y_hat, Q from the hyper-inference network alone: no iterative inference).
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import constriction
import numpy as np
import torch
from scipy.special import ndtr

from codec import coding
from codec.bitstream import Bitstream, Header, pack, pack_alpha, parse, unpack_alpha
from codec.entropy_models import gaussian_likelihood, lower_bound
from codec.errors import BitstreamError, ModelError
from codec.frozen import (
    KA,
    LATENT_LIMIT,
    Z_SUPPORT,
    CodingTables,
    freeze_hyper_synthesis,
    freeze_y_tables,
    freeze_z_tables,
    hyper_synthesis_exact,
    scale_table,
)
from codec.images import PreparedImage, output_pixels, pad_to_multiple
from codec.inference import InferenceConfig, sga_round
from codec.metrics import bpp, psnr
from codec.model import DOWNSAMPLE, MeanScaleHyperprior, conv, with_uniform_noise
from codec.registry import (
    REGISTRY,
    ModelEntry,
    find,
    on_device,
    read_model_file,
    register,
    write_model_file,
)
from codec.tiling import analysis, masked_sse, synthesize_pixels

Z_GRID_BITS = 3  # z_hat on the grid 2^-3
BBVI_LR = 3e-3  # reproducible BBVI: Adam's learning rate (paper S3)
BBVI_SEED = 0x5B1B  # its noise; the paper uses one fixed seed for encoder and decoder
DEFAULT_BBVI_STEPS = 500  # a quarter of the paper's 2000: the decoder runs them too
Q_FRAC_BITS = 8  # Q's mean and std, in grid steps, are rounded to 2^-8
Y_OFFSETS = 16  # y tables per unit of the mean's fractional part
MAX_SIDE_INFO = 1 << 20  # bytes: the experimental mode carries captions, hashes, keys
METHODS = ("sga-bb", "bb-no-sga", "bb-amortized")
_LOG2_2PIE = 0.5 * math.log2(2 * math.pi * math.e)
_FRAME = struct.Struct(">II")  # side-information length, CRC-32
_WORD = np.dtype(">u4")
_THREADS_LOCK = threading.Lock()


class SideInfoError(BitstreamError):
    """The image decodes, but the side information cannot be recovered from this stream
    on this machine."""


# ------------------------------------------------------------------------------ model


class BitsBackHyperprior(MeanScaleHyperprior):
    """The mean-scale hyperprior with a Gaussian q(z | y) and a grid for z_hat (S2)."""

    def __init__(self, N: int = 128, M: int = 192, z_grid_bits: int = Z_GRID_BITS) -> None:
        super().__init__(N, M)
        self.h_a[-1] = conv(N, 2 * N)  # mean and log-std of q(z | y)
        self.z_grid_bits = z_grid_bits

    @property
    def z_step(self) -> float:
        return 2.0 ** -self.z_grid_bits

    def posterior(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_z, sigma_z) of q(z | y); sigma_z >= one grid step, where the continuous
        entropy is still the discrete one's."""
        mu, log_sigma = self.h_a(y).chunk(2, dim=1)
        return mu, lower_bound(torch.exp(log_sigma), self.z_step)

    def net_bits(self, y_hat: torch.Tensor, z: torch.Tensor, sigma_z: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: bits of y_hat given z, bits of z on the grid, and the bits got back,
        the entropy of q (grid-discretized). The net rate is the first two minus the third."""
        mu_y, sigma_y = self.hyper_synthesis(z)
        y_bits = -torch.log2(gaussian_likelihood(y_hat, mu_y, sigma_y)).sum(dim=(1, 2, 3))
        z_bits = -torch.log2(self.p_z.likelihood(z, self.z_step)).sum(dim=(1, 2, 3))
        back = (torch.log2(sigma_z / self.z_step) + _LOG2_2PIE).sum(dim=(1, 2, 3))
        return y_bits, z_bits, back


def from_msh(msh: MeanScaleHyperprior, z_grid_bits: int = Z_GRID_BITS,
             sigma0: float = 0.5) -> BitsBackHyperprior:
    """A bits-back model starting from a trained MSH: same transforms, h_a's last layer
    doubled (its means as before, log-stds starting at log sigma0)."""
    bb = BitsBackHyperprior(msh.N, msh.M, z_grid_bits)
    state = msh.state_dict()
    last = f"h_a.{len(msh.h_a) - 1}"
    w, b = state[f"{last}.weight"], state[f"{last}.bias"]
    state[f"{last}.weight"] = torch.cat([w, torch.zeros_like(w)])
    state[f"{last}.bias"] = torch.cat([b, torch.full_like(b, math.log(sigma0))])
    bb.load_state_dict(state)
    return bb


def hyper_parameters(model: BitsBackHyperprior) -> list[torch.nn.Parameter]:
    """What fine-tuning from an MSH trains: h_a, h_s and p(z); g_a and g_s stay as they
    were, so the distortion term is constant and a step costs one g_a forward."""
    return [*model.h_a.parameters(), *model.h_s.parameters(), *model.p_z.parameters()]


def finetune_loss(model: BitsBackHyperprior, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """NELBO rate terms (bpp) of a batch with frozen g_a: uniform noise on y (Eq. 3),
    a reparameterized sample of q(z | y)."""
    with torch.no_grad():
        y = model.g_a(x)
    y_tilde = with_uniform_noise(y)
    mu_z, sigma_z = model.posterior(y)
    z = mu_z + sigma_z * torch.randn_like(mu_z)
    y_bits, z_bits, back = model.net_bits(y_tilde, z, sigma_z)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    net = (y_bits + z_bits - back).sum() / pixels
    return {"loss": net, "y_bpp": y_bits.sum() / pixels, "z_bpp": z_bits.sum() / pixels,
            "back_bpp": back.sum() / pixels}


def finetune(model: BitsBackHyperprior, folders: list[str], steps: int, batch_size: int = 8,
             crop: int = 128, lr: float = 3e-4, seed: int = 0, log_every: int = 100,
             log: Callable[[dict], None] = print) -> BitsBackHyperprior:
    """Train the hyper parts on the NELBO's net rate (g_a, g_s frozen); lr / 10 for the
    last 20% of the steps. Crops as in codec.train."""
    from codec.train import image_files, make_sampler

    torch.manual_seed(seed)
    sampler = make_sampler(image_files(folders), crop, seed, torch.device("cpu"))
    opt = torch.optim.Adam(hyper_parameters(model), lr=lr)
    model.train()
    for p in [*model.g_a.parameters(), *model.g_s.parameters()]:
        p.requires_grad_(False)
    t0, totals = time.perf_counter(), {}
    for step in range(1, steps + 1):
        if step == int(0.8 * steps) + 1:
            for group in opt.param_groups:
                group["lr"] = lr / 10
        terms = finetune_loss(model, sampler.batch(batch_size))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            log({"step": step, **{k: v / n for k, v in totals.items()},
                 "seconds_per_step": (time.perf_counter() - t0) / n})
            t0, totals = time.perf_counter(), {}
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


# --------------------------------------------------------------------- frozen tables


def y_offset_tables() -> tuple[list[np.ndarray], np.ndarray]:
    """P(j | o / 16, sigma_t) of the integer j around round(mu), for every scale index t
    and mean offset o in -8..8 (table id t * 17 + o + 8), float64 rounded to 2^-40, with
    an escape bin last; and each table's radius."""
    pmfs, radius = [], []
    for s in scale_table():
        r = max(1, math.ceil(8.0 * s)) + 1
        j = np.arange(-r, r + 1, dtype=np.float64)
        for o in range(-Y_OFFSETS // 2, Y_OFFSETS // 2 + 1):
            c = j - o / Y_OFFSETS
            # the mass of [c - 1/2, c + 1/2] from the nearer tail, where ndtr is precise
            far = -np.abs(c)
            p = ndtr((far + 0.5) / s) - ndtr((far - 0.5) / s)
            p = np.round(p * 2.0**40) / 2.0**40
            pmfs.append(np.append(p, max(1.0 - p.sum(), 0.0)))
            radius.append(r)
    return pmfs, np.array(radius, np.int64)


def _digest(tables: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for t in tables:
        h.update(np.ascontiguousarray(t, "<f8").tobytes())
    return h.hexdigest()


class _LazyCosts:
    """coding.TableCost per table, made when first needed (2,176 y tables, few used)."""

    def __init__(self, pmfs: list[np.ndarray]) -> None:
        self.pmfs, self._costs = pmfs, {}

    def __getitem__(self, i: int) -> coding.TableCost:
        c = self._costs.get(i)
        if c is None:
            c = self._costs[i] = coding._table_cost(self.pmfs[i])
        return c


@dataclass
class BitsBackModel:
    """A loaded bits-back model: float net (CPU, eval) and everything coding needs."""

    entry: ModelEntry
    model: BitsBackHyperprior
    tables: CodingTables  # z tables on the grid, exact h_s taking grid indices
    y_pmfs: list[np.ndarray]
    y_radius: np.ndarray

    def __post_init__(self) -> None:
        self.y_models = coding._Models(self.y_pmfs)
        self.y_costs = _LazyCosts(self.y_pmfs)
        self._copies: dict[torch.device, BitsBackHyperprior] = {}

    def on(self, device: torch.device) -> BitsBackHyperprior:
        return on_device(self.model, self._copies, device)


def default_model_id(registry: Path = REGISTRY) -> str:
    """The shipped bits-back model (the one there is), for `--method sga-bb` alone."""
    from codec.registry import entries
    found = [e.id for e in entries(registry) if e.bits_back is not None]
    if not found:
        raise ModelError("no bits-back model is registered; train one with "
                         "`sgarc train --bits-back`")
    return found[0]


@lru_cache(maxsize=4)
def load(model_id: str, registry: Path = REGISTRY) -> BitsBackModel:
    entry = find(model_id, registry)
    if entry.bits_back is None:
        raise ModelError(f"model {model_id!r} is not a bits-back model; the bits-back methods "
                         f"({', '.join(METHODS)}) need one (see `sgarc models`)")
    state = read_model_file(entry, registry)
    net = BitsBackHyperprior(entry.N, entry.M, entry.bits_back)
    net.load_state_dict({k: v.float() for k, v in state["state_dict"].items()})
    net.eval()
    tables = CodingTables.from_state_dict(state["tables"], net.h_s)
    tables = replace(tables, hs=freeze_hyper_synthesis(net.h_s, entry.bits_back))
    y_pmfs, y_radius = y_offset_tables()
    stored = bytes(state["y_digest"].tolist()).hex()
    if _digest(y_pmfs) != stored:
        raise ModelError(f"this machine computes the y tables of bits-back model {entry.id!r} "
                         "differently from the machine that exported it, so its streams "
                         "would not decode exactly here; decode them on another machine")
    return BitsBackModel(entry, net, tables, y_pmfs, y_radius)


def export(model: BitsBackHyperprior, model_id: str, lmbda: float, steps: int, data: str,
           note: str = "", registry: Path = REGISTRY) -> ModelEntry:
    """Freeze the grid z tables and the exact h_s, write the model file (weights in fp16,
    frozen from exactly the weights the decoder will load), register it."""
    model = model.cpu().eval()
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    g = model.z_grid_bits
    with torch.no_grad():
        pmf, k = model.p_z.pmf_table(Z_SUPPORT << g, model.z_step)
    z_pmfs, z_lo = freeze_z_tables(pmf, k)
    thresholds, y_pmfs = freeze_y_tables()
    tables = CodingTables(freeze_hyper_synthesis(model.h_s, g), thresholds, y_pmfs, z_pmfs,
                          z_lo)
    digest = bytes.fromhex(_digest(y_offset_tables()[0]))
    payload = {"state_dict": {k: v.half() if v.is_floating_point() else v
                              for k, v in model.state_dict().items()},
               "tables": tables.state_dict(),
               "y_digest": torch.tensor(list(digest), dtype=torch.uint8)}
    name, sha = write_model_file(payload, model_id, registry)
    entry = ModelEntry(model_id, 0, lmbda, model.N, model.M, steps, data, name, sha, note,
                       bits_back=g)
    register(entry, registry)
    load.cache_clear()
    return entry


# ------------------------------------------------------------------------ y coding


def _y_layout(bm: BitsBackModel, z_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(round(mu), table id) of every y element, from the exact hyper-synthesis."""
    mu, index = hyper_synthesis_exact(bm.tables, z_grid[None])
    mu_int = np.rint(mu[0] * 2.0**KA).astype(np.int64)  # exact: mu is mu_int / 2^16
    half = 1 << (KA - 1)
    base = (mu_int + half) >> KA
    frac = mu_int - (base << KA)  # in [-2^15, 2^15)
    shift = KA - int(math.log2(Y_OFFSETS))
    offset = (frac + (1 << (shift - 1))) >> shift  # in -8..8
    return base, index[0].astype(np.int64) * (Y_OFFSETS + 1) + offset + Y_OFFSETS // 2


def _encode_y(bm: BitsBackModel, y_hat: np.ndarray, z_grid: np.ndarray) -> np.ndarray:
    base, table = _y_layout(bm, z_grid)
    j = y_hat - base
    order, counts = coding._y_order(table)
    flat, groups, pos = j.ravel()[order], [], 0
    for t, n in counts:
        groups.append((t, flat[pos:pos + n]))
        pos += n
    return coding._encode_groups(groups, -bm.y_radius, 2 * bm.y_radius + 1, bm.y_models,
                                 bm.y_costs)


def _decode_y(bm: BitsBackModel, words: np.ndarray, z_grid: np.ndarray) -> np.ndarray:
    base, table = _y_layout(bm, z_grid)
    order, counts = coding._y_order(table)
    coding.check_capacity(words, counts, bm.y_costs, "the latents (YLAT)")
    values = coding._decode_groups(words, counts, -bm.y_radius, 2 * bm.y_radius + 1,
                                   bm.y_models, bm.y_costs)
    j = np.empty(table.size, np.int64)
    j[order] = np.concatenate(values) if values else np.zeros(0, np.int64)
    return j.reshape(table.shape) + base


# ---------------------------------------------------------------- z and side info


def _keystream(n: int) -> np.ndarray:
    """Fixed pseudo-random words that whiten the side information (text is not random
    bits, and Q's choices should be), from PCG64's raw output (stable by definition)."""
    raw = np.random.PCG64(BBVI_SEED).random_raw(-(-n // 2))
    return np.asarray(raw, np.uint64).view(np.uint32)[:n].copy()


def _frame(side_info: bytes, need_bits: float) -> np.ndarray:
    """Length, CRC-32 and the bytes, whitened, as the bottom of an ANS stack; random words
    on top where they are fewer than Q will take (`need_bits`, with its margin), so that Q
    always decodes from data: those count as file bits, not as side information."""
    body = _FRAME.pack(len(side_info), zlib.crc32(side_info)) + side_info
    body += b"\0" * (-len(body) % 4)
    words = np.frombuffer(body, _WORD).astype(np.uint32) ^ _keystream(len(body) // 4)
    pad = max(0, math.ceil(need_bits / 32) - len(words))
    filler = np.asarray(np.random.PCG64(BBVI_SEED + 1).random_raw(pad), np.uint64)
    return np.concatenate([words, (filler >> np.uint64(32)).astype(np.uint32)])


def _unframe(words: np.ndarray) -> bytes:
    n = len(words)
    plain = (words[:n] ^ _keystream(n)).astype(_WORD).tobytes()
    if len(plain) < _FRAME.size:
        raise SideInfoError("the stream carries no side information")
    length, crc = _FRAME.unpack_from(plain)
    data = plain[_FRAME.size:_FRAME.size + length]
    if length > MAX_SIDE_INFO or len(data) != length or zlib.crc32(data) != crc:
        raise SideInfoError("the side information did not come back intact (its CRC "
                            "differs): this machine's BBVI does not reproduce the encoder's")
    return data


def _q_model(bm: BitsBackModel, c: int):
    lo = int(bm.tables.z_lo[c])
    return constriction.stream.model.QuantizedGaussian(lo, lo + len(bm.tables.z_pmfs[c]) - 2)


def _q_params(q_mean: np.ndarray, q_std: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    one = float(1 << Q_FRAC_BITS)
    return q_mean[c].ravel() / one, q_std[c].ravel() / one


def _q_digest(q_mean: np.ndarray, q_std: np.ndarray) -> int:
    return zlib.crc32(q_std.astype(">i8").tobytes(), zlib.crc32(q_mean.astype(">i8").tobytes()))


def q_capacity_bits(q_std: np.ndarray) -> float:
    """About -log2 Q(z_hat) in expectation: what the choice of z_hat carries."""
    return float(np.sum(np.log2(q_std / float(1 << Q_FRAC_BITS)) + _LOG2_2PIE))


def _stack_need_bits(q_std: np.ndarray) -> float:
    """What the stack must hold so that Q does not run dry: its expected bits plus four
    standard deviations (about 1 bit^2 per element) and two words."""
    return q_capacity_bits(q_std) + 4.0 * math.sqrt(q_std.size) + 64.0


def _z_models(bm: BitsBackModel):
    return coding._models(bm.tables)[0]


def _encode_z(bm: BitsBackModel, stack: np.ndarray, q_mean: np.ndarray, q_std: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """Algorithm 1, lines 4-5 for z: decode z_hat from the side-information stack with Q,
    then encode it with P. Returns z_hat (grid indices, (C, h, w)), the stack's words, and
    the bits Q took from the stack (-log2 Q(z_hat), to the coder's precision)."""
    C = q_mean.shape[0]
    coder = constriction.stream.stack.AnsCoder(stack, seal=True)
    before = coder.num_bits()
    z = np.empty(q_mean.shape, np.int64)
    for c in range(C):
        z[c] = coder.decode(_q_model(bm, c), *_q_params(q_mean, q_std, c)).reshape(z[c].shape)
    taken = before - coder.num_bits()
    lo, models = bm.tables.z_lo, _z_models(bm)
    for c in reversed(range(C)):
        coder.encode_reverse((z[c].ravel() - lo[c]).astype(np.int32), models[c])
    return z, coder.get_compressed(), taken


def _decode_z(bm: BitsBackModel, words: np.ndarray, shape: tuple[int, int, int]):
    """z_hat (grid indices) and the coder holding what lies beneath (the side info)."""
    C, h, w = shape
    coding.check_capacity(words, [(c, h * w) for c in range(C)], coding.table_costs(
        bm.tables)[0], "the hyper-latents (ZLAT)")
    lo, models = bm.tables.z_lo, _z_models(bm)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32))
        z = np.stack([coder.decode(models[c], h * w).astype(np.int64) + lo[c]
                      for c in range(C)])
    except Exception as exc:  # constriction reports garbage input as various errors
        raise BitstreamError(f"corrupt latent stream: entropy decoding failed ({exc})") from exc
    if np.any(z - lo[:, None] >= np.array([len(p) - 1 for p in bm.tables.z_pmfs])[:, None]):
        raise BitstreamError("corrupt latent stream: a hyper-latent outside its table")
    return z.reshape(C, h, w), coder


def _recover(bm: BitsBackModel, coder, z: np.ndarray, q_mean: np.ndarray,
             q_std: np.ndarray) -> bytes:
    """Algorithm 1, line 8: encode z_hat with Q onto what lay beneath it: xi's stack."""
    for c in reversed(range(z.shape[0])):
        coder.encode_reverse(z[c].ravel().astype(np.int32), _q_model(bm, c),
                             *_q_params(q_mean, q_std, c))
    try:
        words = coder.get_compressed(unseal=True)
    except Exception as exc:
        raise SideInfoError(f"the side information did not come back intact ({exc})") from exc
    return _unframe(np.asarray(words, np.uint32))


# --------------------------------------------------------------------- inference


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """BBVI must give the same bits at encoder and decoder: one CPU thread, always."""
    with _THREADS_LOCK:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(saved)


def reproducible_bbvi(bm: BitsBackModel, y_hat: np.ndarray, steps: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1, lines 9-10: (mu_z, sigma_z) from y_hat alone, as fixed-point grid
    units (2^-Q_FRAC_BITS steps, int64 (C, h, w)); bit-identical wherever it reproduces."""
    model = bm.model
    with _one_cpu_thread(), torch.enable_grad():
        y = torch.from_numpy(np.ascontiguousarray(y_hat)).float()[None]
        with torch.no_grad():
            mu, sigma = model.posterior(y)
        mu = mu.clone().requires_grad_(True)
        rho = torch.log(sigma).clone().requires_grad_(True)
        if steps:
            gen = torch.Generator().manual_seed(BBVI_SEED)
            opt = torch.optim.Adam([mu, rho], lr=BBVI_LR)
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:
                p.requires_grad_(False)
            try:
                for _ in range(steps):
                    s = lower_bound(torch.exp(rho), model.z_step)
                    z = mu + s * torch.randn(mu.shape, generator=gen)
                    y_bits, z_bits, back = model.net_bits(y, z, s)
                    loss = (y_bits + z_bits - back).sum() / y.numel()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            finally:
                for p in params:
                    p.requires_grad_(True)
        with torch.no_grad():
            scale = float(1 << (model.z_grid_bits + Q_FRAC_BITS))
            q_mean = torch.round(mu * scale).to(torch.int64)[0].numpy()
            std = torch.clamp(torch.exp(rho), min=model.z_step)
            q_std = torch.round(std * scale).to(torch.int64)[0].numpy()
    lo = bm.tables.z_lo[:, None, None] << Q_FRAC_BITS
    hi = np.array([len(p) - 2 for p in bm.tables.z_pmfs])[:, None, None] << Q_FRAC_BITS
    return np.clip(q_mean, lo, lo + hi), np.clip(q_std, 1 << Q_FRAC_BITS, LATENT_LIMIT << 8)


def _joint_sga(model: BitsBackHyperprior, x: torch.Tensor, sizes: list[tuple[int, int]],
               lmbda: float, cfg: InferenceConfig, y0: torch.Tensor,
               progress: Callable[[int], None] | None) -> torch.Tensor:
    """Algorithm 1, line 2: SGA over y_hat and BBVI over (mu_z, sigma_z), on the NELBO
    (net rate + lmbda * 255^2 * MSE). Returns the rounded y."""
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
    pixels = float(sum(h * w for h, w in sizes))
    with torch.no_grad():
        mu0, sigma0 = model.posterior(y0)
    y = y0.clone().requires_grad_(True)
    mu = mu0.clone().requires_grad_(True)
    rho = torch.log(sigma0).clone().requires_grad_(True)
    opt = torch.optim.Adam([y, mu, rho], lr=cfg.learning_rate)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for t in range(cfg.iterations):
            y_soft = sga_round(y, cfg.tau(t), gen)
            s = lower_bound(torch.exp(rho), model.z_step)
            z = mu + s * torch.randn(mu.shape, generator=gen, device=x.device)
            y_bits, z_bits, back = model.net_bits(y_soft, z, s)
            mse = masked_sse(model.g_s, y_soft, x, sizes).sum() / (3.0 * pixels)
            loss = (y_bits + z_bits - back).sum() / pixels + lmbda * 255.0**2 * mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress(1)
    finally:
        for p in params:
            p.requires_grad_(True)
    return torch.round(y.detach())


# ------------------------------------------------------------------------ the codec


@dataclass
class BitsBackResult:
    data: bytes
    width: int
    height: int
    model_id: str
    method: str
    iterations: int
    bbvi_steps: int
    bits: int  # the whole file
    side_info_bits: int  # what the file carries besides the image (8 * len(side info))
    capacity_bits: int  # -log2 Q(z_hat): the stack bits the choice of z_hat took
    bpp: float  # file bits per pixel
    net_bpp: float  # (file bits - side-information bits) per pixel
    psnr: float
    seconds: float
    device: str

    @property
    def bits_back(self) -> int:
        """Side-information bits the file did not grow by: what z_hat's choice took from
        the side information (the rest of what it took was random filler)."""
        return min(self.side_info_bits, self.capacity_bits)

    def summary(self) -> str:
        return (f"{self.width}x{self.height} {self.method} (experimental): "
                f"{self.bpp:.4f} bpp file, {self.side_info_bits} bits of side information "
                f"({self.bits_back} got back), net {self.net_bpp:.4f} bpp, "
                f"PSNR {self.psnr:.2f} dB, {self.seconds:.1f} s")


def encode(image: PreparedImage, side_info: bytes, model_id: str | None = None,
           method: str = "sga-bb", config: InferenceConfig | None = None,
           bbvi_steps: int = DEFAULT_BBVI_STEPS, device: str | torch.device = "cpu",
           registry: Path = REGISTRY,
           progress: Callable[[int], None] | None = None) -> BitsBackResult:
    """Algorithm 1, `encode(x, xi)`: a version-4 stream of the image carrying `side_info`."""
    if method not in METHODS:
        raise ValueError(f"unknown bits-back method {method!r}; choose one of "
                         f"{', '.join(METHODS)}")
    if len(side_info) > MAX_SIDE_INFO:
        raise ValueError(f"side information of {len(side_info)} bytes; at most "
                         f"{MAX_SIDE_INFO} are carried")
    if method == "bb-amortized":  # A6: Q from the hyper-inference network alone
        bbvi_steps = 0
    if bbvi_steps < 0:
        raise ValueError("bbvi_steps must be >= 0")
    config = config or InferenceConfig()
    t0 = time.perf_counter()
    bm = load(model_id or default_model_id(registry), registry)
    device = torch.device(device)
    model = bm.on(device)
    info = image.info
    x = torch.from_numpy(pad_to_multiple(image.rgb, DOWNSAMPLE)[None]).to(device)
    x = x.permute(0, 3, 1, 2)  # 8-bit: codec.tiling scales each tile to [0, 1]
    sizes = [(info.height, info.width)]
    with torch.no_grad():
        y0 = analysis(model, x)
    iterations = config.iterations if method == "sga-bb" else 0
    y_hat = (_joint_sga(model, x, sizes, bm.entry.lmbda, config, y0, progress) if iterations
             else torch.round(y0))
    y_hat = y_hat.clamp(-LATENT_LIMIT, LATENT_LIMIT)[0].to(torch.int64).cpu().numpy()
    q_mean, q_std = reproducible_bbvi(bm, y_hat, bbvi_steps)
    z, z_words, capacity = _encode_z(bm, _frame(side_info, _stack_need_bits(q_std)), q_mean,
                                     q_std)
    sections = {"ZLAT": z_words.astype(_WORD).tobytes(),
                "YLAT": _encode_y(bm, y_hat, z).astype(_WORD).tobytes()}
    if image.alpha is not None:
        sections["ALPH"] = pack_alpha(np.ascontiguousarray(image.alpha).tobytes())
    if image.metadata is not None and image.metadata.fields():
        sections["META"] = image.metadata.pack()
    header = Header(bm.entry.id, info.width, info.height, info.color, info.orientation,
                    info.bit_depth, bbvi_steps=bbvi_steps, q_digest=_q_digest(q_mean, q_std))
    data = pack(Bitstream(header, sections))
    # the stream must decode to these latents, and give the side information back
    bs = parse(data)
    z_dec, y_dec, coder = _decode_latents(bs, bm)
    if not (np.array_equal(z_dec, z) and np.array_equal(y_dec, y_hat)
            and _recover(bm, coder, z_dec, q_mean, q_std) == side_info):
        raise RuntimeError("internal error: the bits-back stream does not decode to what was "
                           "encoded; nothing was written")
    rgb = synthesize_pixels(model.g_s, torch.from_numpy(y_hat).float()[None].to(device),
                            info.height, info.width)[0]
    bits, pixels = 8 * len(data), info.width * info.height
    return BitsBackResult(
        data, info.width, info.height, bm.entry.id, method, iterations, bbvi_steps, bits,
        8 * len(side_info), capacity, bpp(len(data), info.width, info.height),
        (bits - 8 * len(side_info)) / pixels,
        psnr(output_pixels(rgb, info.color), output_pixels(image.rgb, info.color)),
        time.perf_counter() - t0, str(device))


def _decode_latents(bs: Bitstream, bm: BitsBackModel):
    from codec.api import latent_shapes  # (codec.api imports this module lazily)

    if bs.header.pad_mode != "replicate":  # its decoder runs h_a over the whole y grid
        raise BitstreamError(f"a bits-back stream has the replicate layout, not "
                             f"{bs.header.pad_mode!r}")
    z_shape, y_shape = latent_shapes(bm, bs.header.width, bs.header.height, "replicate")
    n_z, n_y = int(np.prod(z_shape)), int(np.prod(y_shape))
    z_payload, y_payload = bs.sections["ZLAT"], bs.sections["YLAT"]
    if (len(z_payload) % 4 or len(z_payload) // 4 > coding.max_stream_words(n_z)
            + MAX_SIDE_INFO // 4 + 2 * n_z + 8):  # side info, Q's filler (< 64 bits each)
        raise BitstreamError(f"section ZLAT has an invalid length {len(z_payload)}")
    if len(y_payload) % 4 or len(y_payload) // 4 > coding.max_stream_words(n_y):
        raise BitstreamError(f"section YLAT has an invalid length {len(y_payload)} for "
                             f"{n_y} symbols")
    z, coder = _decode_z(bm, np.frombuffer(z_payload, _WORD).astype(np.uint32), z_shape)
    y = _decode_y(bm, np.frombuffer(y_payload, _WORD).astype(np.uint32), z)
    return z, y, coder


def _stream(data: bytes | Bitstream, registry: Path) -> tuple[Bitstream, BitsBackModel]:
    bs = data if isinstance(data, Bitstream) else parse(data)
    h = bs.header
    if h.bbvi_steps is None:
        raise BitstreamError("not a bits-back stream (format version 4)")
    try:
        return bs, load(h.model_id, registry)
    except ModelError as exc:
        raise BitstreamError(f"stream was written with model {h.model_id!r}, which is not "
                             f"available: {exc}") from exc


def _side_info_of(bs: Bitstream, bm: BitsBackModel, z: np.ndarray, y: np.ndarray,
                  coder) -> bytes:
    """Algorithm 1, lines 7-8: reproducible BBVI from y_hat, then z_hat under Q."""
    h = bs.header
    q_mean, q_std = reproducible_bbvi(bm, y, h.bbvi_steps)
    if _q_digest(q_mean, q_std) != h.q_digest:
        raise SideInfoError(
            "the side information cannot be recovered on this machine: its BBVI "
            f"({h.bbvi_steps} steps, CPU, one thread, torch {torch.__version__}) does not "
            "reproduce the encoder's; the image decodes without it (leave out "
            "--side-info-out), and the side information can be read on a machine of the "
            "kind that encoded it")
    return _recover(bm, coder, z, q_mean, q_std)


def recover_side_info(data: bytes | Bitstream, registry: Path = REGISTRY) -> bytes:
    """The side information alone: the latents and BBVI, no synthesis of the image."""
    bs, bm = _stream(data, registry)
    return _side_info_of(bs, bm, *_decode_latents(bs, bm))


def decode(data: bytes | Bitstream, side_info: bool = False, registry: Path = REGISTRY,
           device: str | torch.device = "cpu"
           ) -> tuple[np.ndarray, np.ndarray | None, bytes | None]:
    """Algorithm 1, `decode(s)`: (8-bit RGB pixels, alpha or None, the side information
    when asked for, else None). Without `side_info` no BBVI runs: the image alone is cheap."""
    bs, bm = _stream(data, registry)
    h = bs.header
    z, y, coder = _decode_latents(bs, bm)
    xi = _side_info_of(bs, bm, z, y, coder) if side_info else None
    device = torch.device(device)
    rgb = synthesize_pixels(bm.on(device).g_s, torch.from_numpy(y).float()[None].to(device),
                            h.height, h.width)[0]
    alpha = None
    if "ALPH" in bs.sections:
        alpha = np.frombuffer(unpack_alpha(bs.sections["ALPH"], h.width, h.height),
                              np.uint8).reshape(h.height, h.width)
    return rgb, alpha, xi
