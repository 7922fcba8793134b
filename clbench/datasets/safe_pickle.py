"""Reading CIFAR-100's pickled files without letting them run code.

The official CIFAR-100 "python version" (``cifar-100-python/{train,test,meta}``) is a set of pickles holding
only dicts, lists, strings, numbers and uint8 NumPy arrays. A pickle can name any importable callable, so a
planted file would run code under ``pickle.load`` (which torchvision's ``CIFAR100`` calls). :func:`load` uses
an unpickler whose ``find_class`` allows only what NumPy needs to rebuild an array; anything else (``os.system``,
``builtins.eval``, ...) is a :class:`pickle.UnpicklingError` naming the refused global. Builtin containers and
scalars need no global at all, so they are unaffected.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

# What pickled ndarrays reference (NumPy 1 and 2 module names; _codecs.encode rebuilds bytes in protocol 2).
ALLOWED = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5: an array rebuilt from its bytes
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})
MAX_BYTES = 1 << 30  # the largest CIFAR-100 file (train) is 155 MB


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR-100 file holds only arrays, "
                                         "lists and dicts; this one would run code)")
        return super().find_class(module, name)


def load(path: str | Path, encoding: str = "latin1") -> Any:
    """Unpickle ``path`` allowing only builtin containers/scalars and NumPy arrays (see :data:`ALLOWED`).

    Only a regular file of at most :data:`MAX_BYTES` is read (:mod:`clbench.storage.safeio`)."""
    from clbench.storage.safeio import read_bytes

    data = read_bytes(Path(path), "CIFAR-100 file", "re-extract cifar-100-python.tar.gz there", MAX_BYTES)
    return _Restricted(io.BytesIO(data), encoding=encoding).load()
