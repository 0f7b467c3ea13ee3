"""Kernels for factorized (low-rank) matmuls and Gram-matrix accumulation.

Importing this package never initialises CUDA: Triton kernels compile on first
use and the optional CUDA extension in ``csrc/`` is loaded lazily.

Note: Hugging Face also ships a hub-kernels library under the import name
``kernels``; transformers accepts only versions in [0.18.2, 0.19.0) of it, so
this package's version stays outside that range on purpose.
"""

__version__ = "0.1.0"

from kernels.gram import gram_accumulate, gram_accumulate_batched  # noqa: E402
from kernels.lowrank_matmul import dense_is_faster, lowrank_matmul  # noqa: E402

__all__ = ["dense_is_faster", "lowrank_matmul", "gram_accumulate", "gram_accumulate_batched", "__version__"]
