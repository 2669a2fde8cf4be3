"""flypool: a process supervisor daemon for web applications."""

__version__ = "0.1.0"
