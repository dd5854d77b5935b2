"""The methods of the suite, each one module that registers itself (robustbench_fvae/methods/
registry.py): ``lora``, ``fvae``, ``vae2lat``, ``bvae2lat``, ``full``, ``linear``, ``bitfit``,
the ``peft`` library's methods as ``peft-<name>``, and any other module put in this folder.
Importing this package imports no torch; the set-up of a model is in
:mod:`robustbench_fvae.methods.setup`.
"""

import importlib
import pkgutil

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

# The package's own machinery; every other module of this folder is a method module, imported
# here so that it registers itself: adding a method is adding one file.
_MACHINERY = frozenset({"registry", "setup", "table", "search", "__main__"})
# Registration order is table order: LoRA, the FVAE family, the reference points, peft's methods,
# then any other method module in name order.
_FIRST = ("lora", "fvae", "reference", "peft_zoo")


def method_modules() -> tuple[str, ...]:
    """The method modules of this folder, in import (= table) order."""
    found = {m.name for m in pkgutil.iter_modules(__path__)} - _MACHINERY
    return (*[m for m in _FIRST if m in found], *sorted(found - set(_FIRST)))


for _module in method_modules():
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Method", "check_adapter_ranges", "find_method", "get_method", "method_label",
           "method_modules", "method_names", "method_order", "register_method",
           "validate_method"]
