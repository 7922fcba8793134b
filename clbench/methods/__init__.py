"""Continual-learning methods, one file per family, registered by name."""

import clbench.methods.diki  # noqa: F401  (registration)
import clbench.methods.icarl  # noqa: F401  (registration)
import clbench.methods.inflora  # noqa: F401  (registration)
import clbench.methods.keeplora  # noqa: F401  (registration)
import clbench.methods.loda  # noqa: F401  (registration)
import clbench.methods.lwf  # noqa: F401  (registration)
import clbench.methods.moe_adapters  # noqa: F401  (registration)
import clbench.methods.wise_ft  # noqa: F401  (registration)
import clbench.methods.zscl  # noqa: F401  (registration)
from clbench.methods import baselines, lora  # noqa: F401  (registration side effects)
from clbench.methods.base import Method, TaskContext
from clbench.methods.registry import get_method, list_methods, register_method

__all__ = ["Method", "TaskContext", "get_method", "list_methods", "register_method"]
