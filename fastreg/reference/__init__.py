"""NumPy reference implementations: readable, float64 accumulation, and the
same internal signatures as the compiled backends (``fastreg.cpu``)."""

import numpy as np

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
