"""Low-rank layers, model surgery and checkpoints.

``from lowrank import LowRankLinear`` is a drop-in replacement for ``nn.Linear``.
Importing this package registers the ``lowrank`` checkpoint format with transformers, so
``AutoModelForCausalLM.from_pretrained`` loads compressed checkpoints. It never initialises
CUDA.
"""

__version__ = "0.1.0"

from lowrank.checkpoint import CheckpointError, load_pretrained, save_pretrained  # noqa: E402
from lowrank.linear import LowRankLinear  # noqa: E402
from lowrank.surgery import (  # noqa: E402
    SizeReport,
    factorize_,
    replace_module_,
    size_report,
    target_linears,
)

__all__ = [
    "CheckpointError",
    "LowRankLinear",
    "SizeReport",
    "factorize_",
    "load_pretrained",
    "replace_module_",
    "save_pretrained",
    "size_report",
    "target_linears",
]
