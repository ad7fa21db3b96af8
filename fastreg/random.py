"""Random numbers: one Philox4x32-10 stream, the same bits on every backend.

Every random kernel in fastreg (dropout, DropConnect, Gaussian noise) draws
from Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind
cuRAND's and PyTorch's CUDA dropout. A call is described completely by a
64-bit ``seed`` and a 64-bit block ``offset``; :class:`Generator` hands out
such pairs and advances its offset by the number of Philox blocks each call
used. A plain integer passed as ``rng`` means ``Generator(that_int, 0)`` (a
fresh generator, so the same int gives the same numbers every call).

The contract (identical in ``fastreg/reference``, ``fastreg/cpu`` and the CUDA
kernels; every line is tested)
--------------------------------------------------------------------------

Philox4x32-10 maps a 128-bit counter ``(c0, c1, c2, c3)`` and a 64-bit key
``(k0, k1)`` (32-bit words) to four 32-bit words. One round, with
``M0 = 0xD2511F53`` and ``M1 = 0xCD9E8D57``::

    hi0:lo0 = M0 * c0            (32 x 32 -> 64-bit product, high and low words)
    hi1:lo1 = M1 * c2
    (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

Ten rounds; between consecutive rounds the key is bumped (mod 2**32) by the
Weyl constants ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85``. In CUDA C++::

    uint4 philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
      for (int r = 0; r < 10; ++r) {
        if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
      }
      return c;
    }

The stream of a call with ``(seed, offset)``:

- key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``, for ``0 <= seed < 2**64``;
- element ``i`` (the C-order linear index of the logical tensor, whatever the
  strides of the arrays) takes 32-bit word ``i % 4`` of the block at the 64-bit
  counter ``n = (offset + i // 4) mod 2**64``, laid out as the counter words
  ``(n & 0xFFFFFFFF, n >> 32, 0, 0)``; words are numbered as the outputs
  ``(c0, c1, c2, c3)`` above;
- a call over ``size`` elements uses ``ceil(size / 4)`` blocks, and a
  :class:`Generator` advances its offset by that many.

What the words become:

- Bernoulli keep (dropout, DropConnect) with drop probability ``p``: element
  ``i`` is kept iff ``word >= floor(p * 2**32)``. The threshold is a 33-bit
  number (``p = 1`` gives ``2**32``, which drops everything): compare in 64
  bits. The keep probability is exactly ``1 - floor(p * 2**32) / 2**32``.
- Uniform in [0, 1): ``(word >> 8) * 2**-24`` (24 bits, exact in float32).
- Standard normal by Box-Muller on the word pairs (0, 1) and (2, 3) of a
  block, ``u = (w >> 8) * 2**-24``::

      r = sqrt(-2 * log(1 - u_a)),  t = 2 * pi * u_b
      z[4n + 0] = r01 * cos(t01),  z[4n + 1] = r01 * sin(t01)
      z[4n + 2] = r23 * cos(t23),  z[4n + 3] = r23 * sin(t23)

  ``1 - u_a`` lies in [2**-24, 1], so ``|z| <= sqrt(2 * 24 * ln 2) = 5.77``
  (a tail of probability 8e-9 is cut). The words are identical on every
  backend; the normals agree to the rounding of each platform's log, sqrt,
  sin and cos (a few ulps in float64), not bit for bit.

Offsets count modulo 2**64 (the stream repeats after 2**64 blocks).
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _backend, _checks

__all__ = ["Generator", "philox4x32", "random_bits", "uniform", "normal"]

SEED_LIMIT = 1 << 64


def _uint64(name, value, caller):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{caller}: '{name}' must be an integer in [0, 2**64), "
                        f"got {type(value).__name__} {value!r}.")
    v = int(value)
    if not 0 <= v < SEED_LIMIT:
        raise ValueError(f"{caller}: '{name}' must be an integer in [0, 2**64), got {value!r}.")
    return v


def blocks_for(size):
    """Philox blocks used by a call over ``size`` elements: ``ceil(size / 4)``."""
    return (int(size) + 3) // 4


class Generator:
    """A seed and a running block offset into its Philox4x32-10 stream.

    Parameters
    ----------
    seed : int in [0, 2**64)
        The Philox key is ``(seed & 0xFFFFFFFF, seed >> 32)``.
    offset : int in [0, 2**64), default 0
        The first block counter handed out.

    Each random call takes ``(seed, offset)`` from the generator and advances
    ``offset`` by the number of Philox blocks the call used
    (``ceil(elements / 4)``), so consecutive calls draw disjoint parts of the
    stream. The same seed and offset give the same numbers on NumPy, Numba and
    CUDA, at any thread count.

    Examples
    --------
    >>> gen = fastreg.random.Generator(1234)
    >>> y, mask = fastreg.dropout(x, 0.1, rng=gen)   # uses (1234, 0)
    >>> mask.offset, gen.offset                      # x.size = 10: 3 blocks used
    (0, 3)
    """

    __slots__ = ("_seed", "_offset")

    def __init__(self, seed, offset=0):
        self._seed = _uint64("seed", seed, "Generator")
        self._offset = _uint64("offset", offset, "Generator")

    @property
    def seed(self):
        return self._seed

    @property
    def offset(self):
        """The block counter the next call will start at."""
        return self._offset

    @property
    def state(self):
        """``(seed, offset)``: ``Generator(*g.state)`` continues where ``g`` is."""
        return self._seed, self._offset

    def take(self, blocks):
        """Reserve ``blocks`` Philox blocks: return ``(seed, offset)`` and advance."""
        state = self.state
        self.advance(blocks)
        return state

    def advance(self, blocks):
        """Skip ``blocks`` Philox blocks (offsets count modulo 2**64)."""
        blocks = _checks.integer("blocks", blocks, caller="Generator.advance", ge=0)
        self._offset = (self._offset + blocks) % SEED_LIMIT

    def __repr__(self):
        return f"fastreg.random.Generator(seed={self._seed}, offset={self._offset})"


def check_rng(rng, caller, *, required=True):
    """Validate ``rng`` (a Generator or an integer seed) without drawing from it."""
    if isinstance(rng, Generator):
        return rng
    if rng is None and not required:
        return None
    if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, numbers.Integral):
        raise TypeError(f"{caller}: 'rng' must be a fastreg.random.Generator or an integer "
                        f"seed, got {type(rng).__name__} {rng!r}.")
    return Generator(_uint64("rng", rng, caller), 0)


def draw(rng, size):
    """``(seed, offset)`` for a call over ``size`` elements; advances a Generator.

    Call it after every other argument is validated: a failed call must not
    move the generator.
    """
    return rng.take(blocks_for(size))


def threshold(p):
    """``floor(p * 2**32)`` (exact: scaling a float64 by 2**32 does not round)."""
    return int(np.floor(float(p) * 4294967296.0))


# --------------------------------------------------------------------------- public draws

def _select(caller, backend, out):
    return _backend.dtypes("random", *(() if out is None else (out,)), backend=backend,
                           caller=caller)


def _shape(shape, caller):
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        shape = tuple(int(_checks.integer("shape", s, caller=caller, ge=0)) for s in shape)
    except TypeError:
        raise TypeError(f"{caller}: 'shape' must be a tuple of integers >= 0, "
                        f"got {shape!r}.") from None
    return shape


def philox4x32(counter, key, *, out=None, backend=None):
    """Philox4x32-10 blocks: ``out[..., :] = philox(counter[..., :], key[..., :])``.

    The raw block function (ten rounds; see the module docstring), for
    known-answer tests and for users who build their own streams.

    Parameters
    ----------
    counter : uint32 array of shape ``(..., 4)``
    key : uint32 array of shape ``(2,)`` or ``counter.shape[:-1] + (2,)``
    out : uint32 array shaped like ``counter``, optional

    Returns
    -------
    uint32 array shaped like ``counter``.
    """
    caller = "philox4x32"
    for name, a in (("counter", counter), ("key", key)):
        if _backend.array_kind(a) is None:
            raise TypeError(f"{caller}: '{name}' must be a NumPy or CuPy array, "
                            f"got {type(a).__name__}.")
        if a.dtype != np.uint32:
            raise TypeError(f"{caller}: '{name}' must be of dtype uint32, got dtype {a.dtype}.")
    _checks.same_kind(caller, counter=counter, key=key, out=out)
    if counter.ndim < 1 or counter.shape[-1] != 4:
        raise ValueError(f"{caller}: 'counter' must have shape (..., 4), got shape "
                         f"{counter.shape}.")
    if key.shape not in ((2,), counter.shape[:-1] + (2,)):
        raise ValueError(f"{caller}: 'key' must have shape (2,) or {counter.shape[:-1] + (2,)}, "
                         f"got shape {key.shape}.")
    impl = _backend.select("random", counter, key, backend=backend, caller=caller)
    (o,) = _checks.out(caller, None if out is None else (out,),
                       [("out", counter.shape, np.dtype(np.uint32), None)],
                       dict(counter=counter, key=key))
    impl.philox4x32(counter, key, o)
    return o


def _draw_into(caller, fn, shape, rng, dtype, dtypes_ok, out, backend):
    shape = _shape(shape, caller)
    impl, dtypes = _select(caller, backend, out)
    dtypes = dtypes_ok or dtypes
    dtype = np.dtype(dtype)
    if dtype not in dtypes:
        raise TypeError(f"{caller}: 'dtype' must be one of "
                        f"{', '.join(d.name for d in dtypes)}, got {dtype.name}.")
    rng = check_rng(rng, caller)
    (o,) = _checks.out(caller, None if out is None else (out,), [("out", shape, dtype, None)], {})
    seed, offset = draw(rng, o.size)
    getattr(impl, fn)(seed, offset, o)
    return o


def random_bits(shape, *, rng, out=None, backend=None):
    """The raw stream: element ``i`` is word ``i % 4`` of block ``offset + i // 4``.

    Returns a uint32 array of ``shape``. Uses ``ceil(size / 4)`` blocks of ``rng``.
    """
    return _draw_into("random_bits", "random_bits", shape, rng, np.uint32,
                      (np.dtype(np.uint32),), out, backend)


def uniform(shape, *, rng, dtype=np.float32, out=None, backend=None):
    """Uniform numbers in [0, 1): ``(word >> 8) * 2**-24`` (exact in float32 and float64).

    Identical bit for bit on every backend. Uses ``ceil(size / 4)`` blocks of ``rng``.
    """
    return _draw_into("uniform", "uniform", shape, rng, dtype, None, out, backend)


def normal(shape, *, rng, dtype=np.float32, out=None, backend=None):
    """Standard normal numbers by Box-Muller on word pairs (0, 1) and (2, 3) of each block.

    Computed in float64 and rounded to ``dtype``; ``|z| <= 5.77`` (24-bit
    uniforms). Agrees across backends to the rounding of log/sin/cos. Uses
    ``ceil(size / 4)`` blocks of ``rng``.
    """
    return _draw_into("normal", "normal", shape, rng, dtype, None, out, backend)
