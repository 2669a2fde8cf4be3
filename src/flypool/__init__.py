"""flypool: a process supervisor daemon for web applications."""

__version__ = "0.1.0"

# Compiled or pure-Python hot path: decided before any of it is imported.
from flypool import _impl

_impl.install()
