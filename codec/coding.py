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

Work bound (docs/bitstream.md): the decoder refuses, before decoding anything, a stream whose
words cannot hold the declared number of symbols (`min_stream_bits`, a lower bound derived
from constriction's quantized tables, below), and a stream that decodes symbols without
consuming data (a drained coder yields its tables' first symbols for free, forever). The
encoder never writes the latter: such a symbol is coded as an escape instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import constriction
import numpy as np

from codec.errors import BitstreamError
from codec.frozen import LATENT_LIMIT, CodingTables

_ESCAPE_RANGE = 1 << 16
_Categorical = constriction.stream.model.Categorical
PRECISION = 24  # constriction's models quantize probabilities to 24 bits
_ONE = 1 << PRECISION
_UNIFORM_FREQ = _ONE // _ESCAPE_RANGE  # every escape value's quantized frequency
_WORD_BITS = 32  # AnsCoder: 32-bit words, 64-bit state
_BIG_A = 1 << (_WORD_BITS - PRECISION)  # x >> 24 while the state is >= 2^32


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


# ------------------------------------------------------------------------ work bound
#
# constriction's AnsCoder has a 64-bit state x and 32-bit words; a symbol of quantized
# frequency f and cumulative frequency c (out of 2^24) is decoded as
#     q = x mod 2^24 (c <= q < c + f),   x <- f * (x >> 24) + q - c,
# after which, while words remain and x < 2^32, x <- x * 2^32 + the next word. With the
# potential  P = 32 * (words left) + log2(x + 1),  a refill never raises P, P starts at most
# 32 * (words in the stream) and an accepted stream ends empty (P = 0). A decode lowers P
# by at least log2 R(a), a = x >> 24, R(a) = (2^24 a + c + f) / (f (a + 1)), which grows
# with a. So, per symbol:
#   * while x >= 2^32 (a >= 256; always the case while words remain): >= kappa = log2 R(256),
#     about -log2(f / 2^24);
#   * once the words are spent and x < 2^32 (the stream's last symbols), P <= 32 is left:
#     with 2^24 <= x, a symbol costs >= log2 R(1), so few can be decoded there; below 2^24
#     a decode is x <- x - c, so symbol s (c >= 1) can be decoded at most ceil(f / c)
#     times in a row; a table's first symbol (c = 0) is decoded there for free and any
#     number of times - which is what a drained coder does - so a stream that does that is
#     refused (`_free_symbol`) and the encoder escapes such a symbol instead.
# Hence a stream of W words holding n_T symbols of table T needs
#     sum_T kappa_T * (n_T - min(n_T, tail_T)) <= 32 W,
# tail_T bounding how many of them the last stage can hold (`TableCost`).


def quantized_cdf(pmf: np.ndarray) -> np.ndarray:
    """The cumulative 24-bit frequencies constriction's ``Categorical(pmf, perfect=False)``
    codes with (its fast leaky quantization: every symbol gets at least 1), length S + 1."""
    p = np.asarray(pmf, np.float64)
    n = len(p)
    cum = np.concatenate([[0.0], np.cumsum(p)])  # sequential float64 sums, as constriction
    scale = float(_ONE - n) / cum[-1]
    return np.append(np.floor(cum[:-1] * scale).astype(np.int64) + np.arange(n), _ONE)


def _coded_cumulative(model, symbols) -> list[int]:
    """c of each symbol, as the coder has it: coding s onto an empty coder leaves x = c."""
    out = []
    for s in symbols:
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(np.array([s], np.int32), model)
        out.append(int(coder.pos()[1]))
    return out


@dataclass(frozen=True)
class TableCost:
    """What one table's symbols cost the coder at least (see the derivation above)."""

    cdf: np.ndarray  # int64 (S + 1,): quantized cumulative frequencies, cdf[S] = 2^24
    kappa: float  # bits per symbol while the coder's state is >= 2^32
    tail: int  # symbols of this table the stream's last 32 bits can hold at most


def _table_cost(pmf: np.ndarray) -> TableCost:
    model = _Categorical(pmf, perfect=False)
    cdf = quantized_cdf(pmf)
    probe = sorted({0, 1, len(pmf) - 1, int(np.argmax(np.diff(cdf)))})
    if _coded_cumulative(model, probe) != [int(cdf[i]) for i in probe]:
        # Not the quantization assumed: take every symbol's from the coder itself.
        cdf = np.array([*_coded_cumulative(model, range(len(pmf))), _ONE], np.int64)
    f = np.diff(cdf).astype(np.float64)
    c = cdf[:-1].astype(np.float64)
    ln2 = math.log(2.0)
    # log2 R(a) = log1p((2^24 a + c + f - f (a + 1)) / (f (a + 1))) / ln 2, exact terms.
    kappa = float(np.min(np.log1p((_ONE * _BIG_A + c - f * _BIG_A) / (f * (_BIG_A + 1)))))
    last = float(np.min(np.log1p((_ONE + c - f) / (2.0 * f)))) / ln2
    tail = int(32.0 / last) + 1 + int(np.sum((f[1:] - 1) // c[1:] + 1))
    # A float margin far above the rounding error keeps the bound on the safe side.
    return TableCost(cdf, kappa / ln2 * (1.0 - 1e-9), tail)


def table_costs(tables: CodingTables) -> tuple[list[TableCost], list[TableCost]]:
    """(z tables', y tables') costs, computed once per table set (a few ms)."""
    costs = tables.__dict__.get("_costs")
    if costs is None:
        costs = tables.__dict__["_costs"] = ([_table_cost(p) for p in tables.z_pmfs],
                                             [_table_cost(p) for p in tables.y_pmfs])
    return costs


def min_stream_bits(counts: list[tuple[int, int]], costs: list[TableCost]) -> float:
    """A lower bound on the bits of any stream the decoder accepts that holds `counts`
    ((table, number of symbols) pairs, escapes not counted)."""
    return sum(costs[t].kappa * max(0, n - costs[t].tail) for t, n in counts)


def check_capacity(words: np.ndarray, counts: list[tuple[int, int]], costs: list[TableCost],
                   what: str) -> None:
    need = min_stream_bits(counts, costs)
    if need > _WORD_BITS * len(words):
        raise BitstreamError(
            f"stream too short for the declared image: {4 * len(words)} bytes cannot hold "
            f"{what}: {sum(n for _, n in counts)} symbols need at least "
            f"{math.ceil(need / 8)} bytes")


def _free_symbol(segments: list[tuple[np.ndarray, np.ndarray | None]]
                 ) -> tuple[int, int] | None:
    """(segment, index) of the last symbol that a coder decodes without consuming data,
    or None. ``segments``: (symbols, cdf) in decoding order, cdf None for escape values.

    Walks back from the end of an emptied coder (x = 0): below 2^24 a decode is
    x <- x - c, so x before each symbol is the sum of the c's after it, and a table's first
    symbol (c = 0) decoded at x < f leaves x as it was. Stops once x >= 2^24 (no earlier
    state is smaller). Looks at the stream's last symbols only, in growing chunks.
    """
    x = 0
    for g in range(len(segments) - 1, -1, -1):
        symbols, cdf = segments[g]
        end, chunk = len(symbols), 256
        while end > 0:
            start = max(0, end - chunk)
            s = symbols[start:end][::-1]
            if cdf is None:
                c, f = s * _UNIFORM_FREQ, np.full(len(s), _UNIFORM_FREQ, np.int64)
            else:
                c, f = cdf[s], cdf[s + 1] - cdf[s]
            before = x + np.concatenate([[0], np.cumsum(c[:-1])])  # x after each decode
            stop = (s == 0) | (before >= f)
            if stop.any():
                i = int(np.argmax(stop))
                return (g, end - 1 - i) if s[i] == 0 and before[i] < f[i] else None
            x = int(before[-1] + c[-1])
            end, chunk = start, chunk * 4
    return None


def _encode_groups(groups: list[tuple[int, np.ndarray]], offsets: np.ndarray,
                   sizes: np.ndarray, models: _Models, costs: list[TableCost]) -> np.ndarray:
    """groups: (table, values) in decoding order. Returns the compressed uint32 words.

    Symbols are int32 (what constriction codes), made once per group: a large image's
    latents are not copied at 64 bits."""
    coder = constriction.stream.stack.AnsCoder()
    symbols, masks = [], []
    for table, values in groups:
        s = np.subtract(values, offsets[table], dtype=np.int32, casting="unsafe")
        escaped = (s < 0) | (s >= sizes[table])
        s[escaped] = sizes[table]
        symbols.append(s)
        masks.append(escaped)
    while True:  # a table's first symbol that the coder would hold for free is escaped
        esc = np.concatenate([v[m] for (_, v), m in zip(groups, masks, strict=True)]
                             ).astype(np.int64) if groups else np.zeros(0, np.int64)
        segments = [(s, costs[t].cdf) for (t, _), s in zip(groups, symbols, strict=True)]
        free = _free_symbol([*segments, (esc + (1 << 15), None)])
        if free is None:
            break
        g, i = free
        if g == len(groups):  # value -32768, which _check_range keeps out
            raise ValueError("escape values must satisfy |v| <= LATENT_LIMIT")
        masks[g][i], symbols[g][i] = True, sizes[groups[g][0]]
    if len(esc):
        coder.encode_reverse((esc + (1 << 15)).astype(np.int32), _uniform())
    for (table, _), s in zip(reversed(groups), reversed(symbols), strict=True):
        coder.encode_reverse(s, models[table])
    return coder.get_compressed()


def _decode_groups(words: np.ndarray, counts: list[tuple[int, int]], offsets: np.ndarray,
                   sizes: np.ndarray, models: _Models, costs: list[TableCost]) -> list[np.ndarray]:
    total = sum(n for _, n in counts)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32))
        segments, n_escaped, done = [], [], 0
        for table, n in counts:
            if coder.is_empty():  # all that follows would come from nothing
                raise BitstreamError(f"corrupt latent stream: the data ran out after {done} "
                                     f"of {total} symbols")
            s = coder.decode(models[table], n)  # int32
            segments.append((s, costs[table].cdf))
            n_escaped.append(int(np.count_nonzero(s == sizes[table])))
            done += n
        n_esc = sum(n_escaped)
        esc = np.zeros(0, np.int64)
        if n_esc:
            esc = coder.decode(_uniform(), n_esc).astype(np.int64)
        empty = coder.is_empty()
    except BitstreamError:
        raise
    except Exception as exc:  # constriction reports garbage input as various errors
        raise BitstreamError(f"corrupt latent stream: entropy decoding failed ({exc})") from exc
    if not empty:
        raise BitstreamError("corrupt latent stream: data left over after the last symbol")
    free = _free_symbol([*segments, (esc, None)])
    if free is not None:
        g, i = free
        at = sum(len(seg) for seg, _ in segments[:g]) + i
        raise BitstreamError(f"corrupt latent stream: symbol {at} of {total + n_esc} was "
                             "decoded without data (the stream ran out)")
    # the symbols become values in place (no second int32 copy of every latent)
    out, pos = [], 0
    for (table, _), (s, _), k in zip(counts, segments, n_escaped, strict=True):
        e = s == sizes[table] if k else None
        np.add(s, offsets[table], out=s, casting="unsafe")
        if k:
            s[e] = esc[pos:pos + k] - (1 << 15)
            pos += k
        out.append(s)
    return out


def _check_range(name: str, values: np.ndarray) -> None:
    if values.size and max(-int(values.min()), int(values.max())) > LATENT_LIMIT:
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
    return _encode_groups(groups, lo, sizes, _models(tables)[0], table_costs(tables)[0])


def decode_z(tables: CodingTables, words: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """z_hat of shape (C, h, w); BitstreamError when the words cannot hold it (checked
    before anything of that size is made) or do not decode to it."""
    C, h, w = shape
    lo, sizes = _z_layout(tables)
    counts = [(c, h * w) for c in range(C)]
    costs = table_costs(tables)[0]
    check_capacity(words, counts, costs, "the hyper-latents (ZLAT)")
    values = _decode_groups(words, counts, lo, sizes, _models(tables)[0], costs)
    return np.stack(values).astype(np.int64).reshape(C, h, w)


# ------------------------------------------------------------------------------ y


def _y_layout(tables: CodingTables):
    radius = tables.y_radius
    return -radius, 2 * radius + 1


def _y_order_counts(index: np.ndarray) -> list[tuple[int, int]]:
    """(table, number of latents) of the tables that `index` uses, in table order."""
    return [(t, n) for t, n in enumerate(np.bincount(index.ravel()).tolist()) if n]


def _y_order(index: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    flat = index.ravel()
    # Scale indices are < NUM_SCALES (128) and a stable order is unique, so 16-bit keys give
    # the same order, and numpy radix-sorts them ~10x faster than it merge-sorts int64.
    order = np.argsort(flat.astype(np.uint16), kind="stable")
    counts = np.bincount(flat, minlength=0)
    return order, [(int(t), int(n)) for t, n in enumerate(counts) if n]


_SORT_CHUNK = 1 << 20  # latents per piece of `_by_table`'s sort


def _by_table(scale_index: np.ndarray, counts: list[tuple[int, int]]
              ) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """`_y_order`'s stable order, in pieces: (group g of `counts`, start and end of the piece
    in g, the raster positions of the piece), chunk by chunk of _SORT_CHUNK raster
    positions, so no int64 permutation of all the latents (8 bytes each) is made. A table's
    positions come in raster order, as in the stable sort of the whole."""
    flat = scale_index.ravel()
    group = {t: g for g, (t, _) in enumerate(counts)}
    filled = [0] * len(counts)
    for a in range(0, flat.size, _SORT_CHUNK):
        part = flat[a:a + _SORT_CHUNK]
        order = np.argsort(part.astype(np.uint16), kind="stable")
        order += a
        pos = 0
        for t, n in enumerate(np.bincount(part).tolist()):
            if n:
                g = group[t]
                yield g, filled[g], filled[g] + n, order[pos:pos + n]
                filled[g] += n
                pos += n


def encode_y(tables: CodingTables, k: np.ndarray, scale_index: np.ndarray) -> np.ndarray:
    """k = y_hat - mu, int (M, H, W); scale_index from `hyper_synthesis_exact`."""
    _check_range("k", k)
    counts = _y_order_counts(scale_index)
    starts = np.cumsum([0] + [n for _, n in counts]).tolist()
    flat, values = np.empty(k.size, k.dtype), k.ravel()
    for g, lo, hi, positions in _by_table(scale_index, counts):
        flat[starts[g] + lo:starts[g] + hi] = values[positions]
    groups = [(table, flat[starts[g]:starts[g + 1]]) for g, (table, _) in enumerate(counts)]
    offsets, sizes = _y_layout(tables)
    return _encode_groups(groups, offsets, sizes, _models(tables)[1], table_costs(tables)[1])


def decode_y(tables: CodingTables, words: np.ndarray, scale_index: np.ndarray) -> np.ndarray:
    """k for the scale indices of `hyper_synthesis_exact`, int32 (|k| <= LATENT_LIMIT);
    BitstreamError when the words cannot hold that many symbols under their tables
    (checked first) or do not decode."""
    counts = _y_order_counts(scale_index)
    costs = table_costs(tables)[1]
    check_capacity(words, counts, costs, "the latents (YLAT)")
    offsets, sizes = _y_layout(tables)
    values = _decode_groups(words, counts, offsets, sizes, _models(tables)[1], costs)
    k = np.empty(scale_index.size, np.int32)
    for g, lo, hi, positions in _by_table(scale_index, counts):  # no copy of all of k
        k[positions] = values[g][lo:hi]
    return k.reshape(scale_index.shape)


def max_stream_words(num_symbols: int) -> int:
    """Upper bound on a valid stream's length: at most 24 + 16 bits per symbol, plus state."""
    return (num_symbols * 40 + 31) // 32 + 4
