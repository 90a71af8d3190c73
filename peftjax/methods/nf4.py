"""4-bit NormalFloat (NF4) with blockwise absmax and double quantisation (Dettmers et al. 2023).

NF4 is the information-theoretically optimal 4-bit code for normally
distributed weights: its 16 values are quantiles of N(0, 1), rescaled to
[-1, 1], with an exact zero. Following the paper (and bitsandbytes), 8
non-negative and 7 negative values are quantiles at evenly spaced
probabilities between 1/2 and p_max = 1 - delta, with
delta = 1/2 (1/30 + 1/32) so that the outermost quantiles are finite:

    q = Phi^-1(p) / Phi^-1(p_max),   p in linspace(p_max, 1/2, 9)[:-1] (and 8 for the negatives)

A weight tensor is flattened and cut into blocks of ``B = 64`` elements. Each
block keeps its absolute maximum c_j (fp32) and 4-bit indices into the code:

    X_nf4 = round_nf4(X / c_j),    dequant(X_nf4) = NF4[X_nf4] * c_j

Two indices are packed per uint8 (the first one in the high nibble), so the
codes take 4 bits per weight and the fp32 scales another 32 / 64 = 0.5 bits.
This is bitsandbytes' ``quantize_4bit`` layout: a caller that flattens a
kernel in torch's (out, in) order (``peftjax.methods.qlora`` does) gets the
blocks, codes and scales bitsandbytes stores for that weight.

Double quantisation quantises the scales themselves, as bitsandbytes'
``compress_statistics``: their mean mu is subtracted (they are all positive),
and the centred scales are cut into blocks of ``B2 = 256``, each divided by
its own absolute maximum s_k and rounded to the nearest value of
bitsandbytes' signed 8-bit "dynamic" map D (``create_dynamic_map()``: a sign,
a decimal exponent from 10^-6 to 10^0 and a linear fraction, so small values
keep their relative precision):

    c_j ~= mu + D[q8_j] * s_k,    s_k = max_{j in block k} |c_j - mu|

which costs 8 / 64 + 32 / (64 * 256) = 0.127 bits per weight instead of 0.5:
4.127 bits in all, the paper's figure. A scale then errs by at most
``absmax_error_factor()`` (half D's largest gap, 0.00703) times s_k.

The rounding error of one weight is at most half the gap between the two code
values around it, times its block's scale: ``max_error_factor()`` is the
largest such half-gap. With double quantisation the scale itself is off by
|c_j - c~_j|, and since |NF4| <= 1 the bound the tests check for every weight
is

    |x - dequant(x)| <= max_error_factor() * c_j + absmax_error_factor() * s_k.

A block whose scale is below ``absmax_error_factor() * s_k`` can come back
with the wrong sign (in bitsandbytes as here); the bound still holds, and the
tests find no such block in MiniLM's ``layer.0.output.dense`` (where linear
int8 codes for the scales flipped two) or in a synthetic kernel with an
outlier scale.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 values from the QLoRA paper (Appendix E), as bitsandbytes stores them.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision boundaries: an input in (MIDPOINTS[i - 1], MIDPOINTS[i]] rounds to NF4_CODE[i].
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``): 256 sorted float32 values.

    For each decade 10^e, e = -6 .. 0, the midpoints of 2^(e+6) + 1 evenly
    spaced points on [0.1, 1], scaled by 10^e, with both signs; then 0 and 1.
    Computed in float64 and rounded once: bitsandbytes rounds each step in
    float32, so a few of its values differ from these in the last bit.
    """
    values = [0.0, 1.0]
    for exponent in range(-6, 1):
        bounds = np.linspace(0.1, 1.0, 2 ** (exponent + 6) + 1)
        means = 10.0**exponent * (bounds[:-1] + bounds[1:]) / 2
        values += [*means, *-means]
    return np.sort(np.array(values)).astype(np.float32)


DYNAMIC_MAP = dynamic_map()
_DYNAMIC_MIDPOINTS = (DYNAMIC_MAP[1:] + DYNAMIC_MAP[:-1]) / 2


def nf4_code_from_quantiles(delta: float = 0.5 * (1 / 32 + 1 / 30)) -> np.ndarray:
    """The NF4 values rebuilt from normal quantiles, as the paper defines them
    (used to check the hard-coded table; ``1 - delta`` = 0.9677...)."""
    from jax.scipy.special import ndtri

    positive = np.asarray(ndtri(np.linspace(1 - delta, 0.5, 9)[:-1]))
    negative = -np.asarray(ndtri(np.linspace(1 - delta, 0.5, 8)[:-1]))
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return (values / np.abs(values).max()).astype(np.float32)


def max_error_factor() -> float:
    """Half the largest gap between adjacent NF4 values: the worst rounding
    error of one weight, in units of its block's absmax."""
    return float(np.max(np.diff(NF4_CODE)) / 2)


def absmax_error_factor() -> float:
    """The worst error of a double-quantised scale, in units of its 8-bit
    block's s_k: half the largest gap of the dynamic map, or the distance
    from -1 to its lowest value (the map has no -1)."""
    return float(max(np.max(np.diff(DYNAMIC_MAP.astype(np.float64))) / 2, 1.0 + float(DYNAMIC_MAP[0])))


def num_blocks(size: int, block_size: int) -> int:
    return math.ceil(size / block_size)


def _blocks(flat: jax.Array, block_size: int) -> jax.Array:
    """``flat`` zero-padded to whole blocks, shaped (blocks, block_size)."""
    pad = num_blocks(flat.size, block_size) * block_size - flat.size
    return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


@functools.partial(jax.jit, static_argnames=("block_size",))
def quantize_nf4(x: jax.Array, *, block_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """Blockwise NF4 quantisation of ``x`` (any shape, flattened row-major).

    Returns ``(codes, absmax)``: uint8 codes, two 4-bit indices per byte,
    ``blocks * block_size / 2`` of them, and the fp32 absmax of each block.
    ``block_size`` must be even so that a block fills whole bytes.
    """
    if block_size % 2:
        raise ValueError(f"block_size={block_size} must be even: two 4-bit codes share a byte")
    blocks = _blocks(jnp.ravel(x).astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # An all-zero block divides by 1 instead: its codes are NF4's exact zero.
    normalised = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    indices = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normalised.ravel(), side="left").astype(jnp.uint8)
    codes = (indices[0::2] << 4) | indices[1::2]
    return codes, absmax


@functools.partial(jax.jit, static_argnames=("size", "block_size"))
def dequantize_nf4(codes: jax.Array, absmax: jax.Array, *, size: int, block_size: int = 64) -> jax.Array:
    """Inverse of :func:`quantize_nf4`: the first ``size`` values, flat, in fp32."""
    indices = jnp.stack([codes >> 4, codes & 0x0F], axis=-1).reshape(-1, block_size)
    values = jnp.asarray(NF4_CODE)[indices] * absmax[:, None]
    return values.ravel()[:size]


@functools.partial(jax.jit, static_argnames=("block_size",))
def quantize_absmax(absmax: jax.Array, *, block_size: int = 256) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double quantisation of the NF4 block scales (bitsandbytes' ``compress_statistics``).

    Returns ``(codes, scales, mean)``: one uint8 index into ``DYNAMIC_MAP``
    per scale (not padded, so the storage is exactly one byte per NF4 block),
    the fp32 absolute maximum of each ``block_size`` centred scales, and the
    fp32 mean that was subtracted. Rounding is to the nearest map value.
    """
    mean = jnp.mean(absmax)
    centred = _blocks(absmax - mean, block_size)
    peak = jnp.max(jnp.abs(centred), axis=1)
    # A block of equal scales divides by 1 instead: its codes are the map's exact zero.
    normalised = jnp.clip(centred * (1.0 / jnp.where(peak > 0, peak, 1.0))[:, None], -1.0, 1.0)
    codes = jnp.searchsorted(jnp.asarray(_DYNAMIC_MIDPOINTS), normalised.ravel(), side="left").astype(jnp.uint8)
    return codes[: absmax.size], peak, mean


@functools.partial(jax.jit, static_argnames=("block_size",))
def dequantize_absmax(codes: jax.Array, scales: jax.Array, mean: jax.Array, *, block_size: int = 256) -> jax.Array:
    """Inverse of :func:`quantize_absmax`: the NF4 block scales in fp32."""
    per_code = jnp.repeat(scales, block_size)[: codes.size]
    return jnp.asarray(DYNAMIC_MAP)[codes] * per_code + mean
