"""A pickle reader that rebuilds numpy arrays and plain containers, and nothing else.

The datasets we read as pickles (Animal-MNIST, CIFAR) hold only arrays, lists and dicts; a
file that asks for any other class is refused before anything in it can run.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

from ..errors import RobustTransferError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5 (Python >= 3.8 can write it)
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 pickles of Python 2 byte strings spell them
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allowed numpy names; refuse every other global before it can run."""
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def load_arrays(handle: BinaryIO, source: str, encoding: str = "ASCII") -> Any:
    """Unpickle ``handle`` allowing only numpy arrays and builtin containers."""
    try:
        return _ArraysOnly(handle, encoding=encoding).load()
    except pickle.UnpicklingError as error:
        raise RobustTransferError(f"{source} is not a plain data pickle ({error}); it was not loaded and "
                                  "nothing in it ran: replace it with the original data file") from None
    except (EOFError, ValueError, TypeError, OSError, AttributeError, IndexError, KeyError) as error:
        raise RobustTransferError(
            f"{source} is truncated or corrupt ({type(error).__name__}: {error}): "
            "replace it with the original"
        ) from None


def loads_arrays(data: bytes, source: str, encoding: str = "ASCII") -> Any:
    """`load_arrays` on bytes already in memory."""
    return load_arrays(io.BytesIO(data), source, encoding)
