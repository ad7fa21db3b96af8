"""Numba CPU kernels, one module per op family, with the reference's signatures."""

import numpy as np

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
