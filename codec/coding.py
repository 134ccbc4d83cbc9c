"""Entropy coding of the integer latents with constriction's ANS coder.

Two independent streams, so the decoder can decode z first and derive y's tables from it:

* z stream: channel c of z_hat is coded with table c (symbol = z_hat - z_lo[c]);
* y stream: each element k = y_hat - mu is coded with the zero-mean Gaussian table of its
  integer scale index (symbol = k + radius). Elements are visited grouped by table index,
  raster order within a group; encoder and decoder derive the same grouping from the same
  integer indices.

A value outside its table's range is coded as the table's escape symbol followed, at the end
of the stream, by the value itself in 16 bits (uniform). Values are limited to
|v| <= LATENT_LIMIT; callers clamp before coding.
"""

from __future__ import annotations

from functools import lru_cache

import constriction
import numpy as np

from codec.errors import BitstreamError
from codec.frozen import LATENT_LIMIT, CodingTables

_ESCAPE_RANGE = 1 << 16
_Categorical = constriction.stream.model.Categorical


@lru_cache(maxsize=1)
def _uniform():
    return constriction.stream.model.Uniform(_ESCAPE_RANGE)


class _Models:
    """constriction models built once per table set (building them is the slow part)."""

    def __init__(self, pmfs: list[np.ndarray]) -> None:
        self.pmfs = pmfs
        self._models: dict[int, object] = {}

    def __getitem__(self, i: int):
        m = self._models.get(i)
        if m is None:
            m = self._models[i] = _Categorical(self.pmfs[i], perfect=False)
        return m


def _models(tables: CodingTables) -> tuple[_Models, _Models]:
    models = tables.__dict__.get("_constriction_models")
    if models is None:
        models = tables.__dict__["_constriction_models"] = (
            _Models(tables.z_pmfs), _Models(tables.y_pmfs))
    return models


def _encode_groups(groups: list[tuple[int, np.ndarray]], offsets: np.ndarray,
                   sizes: np.ndarray, models: _Models) -> np.ndarray:
    """groups: (table, values) in decoding order. Returns the compressed uint32 words."""
    coder = constriction.stream.stack.AnsCoder()
    symbols, escapes = [], []
    for table, values in groups:
        s = values.astype(np.int64) - offsets[table]
        escaped = (s < 0) | (s >= sizes[table])
        escapes.append(values[escaped])
        s[escaped] = sizes[table]
        symbols.append(s.astype(np.int32))
    esc = np.concatenate(escapes) if escapes else np.zeros(0, np.int64)
    if len(esc):
        coder.encode_reverse((esc + (1 << 15)).astype(np.int32), _uniform())
    for (table, _), s in zip(reversed(groups), reversed(symbols), strict=True):
        coder.encode_reverse(s, models[table])
    return coder.get_compressed()


def _decode_groups(words: np.ndarray, counts: list[tuple[int, int]], offsets: np.ndarray,
                   sizes: np.ndarray, models: _Models) -> list[np.ndarray]:
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32))
        out, escaped = [], []
        for table, n in counts:
            s = coder.decode(models[table], n).astype(np.int64)
            escaped.append(s == sizes[table])
            out.append(s + offsets[table])
        n_esc = int(sum(e.sum() for e in escaped))
        if n_esc:
            esc = coder.decode(_uniform(), n_esc).astype(np.int64) - (1 << 15)
            pos = 0
            for values, e in zip(out, escaped, strict=True):
                k = int(e.sum())
                values[e] = esc[pos:pos + k]
                pos += k
        empty = coder.is_empty()
    except BitstreamError:
        raise
    except Exception as exc:  # constriction reports garbage input as various errors
        raise BitstreamError(f"corrupt latent stream: entropy decoding failed ({exc})") from exc
    if not empty:
        raise BitstreamError("corrupt latent stream: data left over after the last symbol")
    return out


def _check_range(name: str, values: np.ndarray) -> None:
    if values.size and int(np.abs(values).max()) > LATENT_LIMIT:
        raise ValueError(f"{name} exceeds the codable range |v| <= {LATENT_LIMIT}; clamp first")


# ------------------------------------------------------------------------------ z


def _z_layout(tables: CodingTables):
    sizes = np.array([len(p) - 1 for p in tables.z_pmfs], np.int64)
    return tables.z_lo, sizes


def encode_z(tables: CodingTables, z_hat: np.ndarray) -> np.ndarray:
    """z_hat: int (C, h, w) -> uint32 words."""
    _check_range("z_hat", z_hat)
    lo, sizes = _z_layout(tables)
    groups = [(c, z_hat[c].ravel()) for c in range(z_hat.shape[0])]
    return _encode_groups(groups, lo, sizes, _models(tables)[0])


def decode_z(tables: CodingTables, words: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    C, h, w = shape
    lo, sizes = _z_layout(tables)
    values = _decode_groups(words, [(c, h * w) for c in range(C)], lo, sizes, _models(tables)[0])
    return np.stack(values).reshape(C, h, w)


# ------------------------------------------------------------------------------ y


def _y_layout(tables: CodingTables):
    radius = tables.y_radius
    return -radius, 2 * radius + 1


def _y_order(index: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    flat = index.ravel()
    # Scale indices are < NUM_SCALES (128) and a stable order is unique, so 16-bit keys give
    # the same order, and numpy radix-sorts them ~10x faster than it merge-sorts int64.
    order = np.argsort(flat.astype(np.uint16), kind="stable")
    counts = np.bincount(flat, minlength=0)
    return order, [(int(t), int(n)) for t, n in enumerate(counts) if n]


def encode_y(tables: CodingTables, k: np.ndarray, scale_index: np.ndarray) -> np.ndarray:
    """k = y_hat - mu, int (M, H, W); scale_index from `hyper_synthesis_exact`."""
    _check_range("k", k)
    order, counts = _y_order(scale_index)
    flat = k.ravel()[order]
    groups, pos = [], 0
    for table, n in counts:
        groups.append((table, flat[pos:pos + n]))
        pos += n
    offsets, sizes = _y_layout(tables)
    return _encode_groups(groups, offsets, sizes, _models(tables)[1])


def decode_y(tables: CodingTables, words: np.ndarray, scale_index: np.ndarray) -> np.ndarray:
    order, counts = _y_order(scale_index)
    offsets, sizes = _y_layout(tables)
    values = _decode_groups(words, counts, offsets, sizes, _models(tables)[1])
    k = np.empty(scale_index.size, np.int64)
    k[order] = np.concatenate(values) if values else np.zeros(0, np.int64)
    return k.reshape(scale_index.shape)


def max_stream_words(num_symbols: int) -> int:
    """Upper bound on a valid stream's length: at most 24 + 16 bits per symbol, plus state."""
    return (num_symbols * 40 + 31) // 32 + 4
