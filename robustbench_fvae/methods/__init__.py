"""The methods of the suite, each one module that registers itself (robustbench_fvae/methods/
registry.py): ``lora``, ``fvae``, ``vae2lat``, ``bvae2lat``, ``full``, ``linear``, and the
``peft`` library's methods as ``peft-<name>``. Importing this package imports no torch; the
set-up of a model is in :mod:`robustbench_fvae.methods.setup`.
"""

# isort: off
# Registration order is table order: LoRA, the FVAE family, the reference points.
from . import lora  # noqa: F401  (each module registers its methods)
from . import fvae  # noqa: F401
from . import reference  # noqa: F401
from . import peft_zoo  # noqa: F401
# isort: on
from .registry import (
    Method,
    check_adapter_ranges,
    find_method,
    get_method,
    method_label,
    method_names,
    method_order,
    register_method,
    validate_method,
)

__all__ = ["Method", "check_adapter_ranges", "find_method", "get_method", "method_label",
           "method_names", "method_order", "register_method", "validate_method"]
