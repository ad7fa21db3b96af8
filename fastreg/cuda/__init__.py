"""CUDA kernels (kernels/*.cu) launched through CuPy, or under the host emulation.

Each family module (``norm``, ``prox``, ``random``, ``dropout``) has the
reference's function names and signatures. The same launchers serve two
devices (``_device.py``): CuPy arrays run the kernels on the current CUDA
device and stream (backend "cuda"); NumPy arrays run them under the host
emulation (backend "cuda_emulator", used by the tests where no GPU is
present).
"""

import ml_dtypes
import numpy as np

DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
          np.dtype(np.float64))
# Instance-name tag of each dtype, and its elements per 16-byte vector.
TAGS = {DTYPES[0]: "f16", DTYPES[1]: "bf16", DTYPES[2]: "f32", DTYPES[3]: "f64"}
VEC = {"f16": 8, "bf16": 8, "f32": 4, "f64": 2}
