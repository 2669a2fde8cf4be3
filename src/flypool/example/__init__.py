"""flypool's example worker: ``python -m flypool.example`` (see `server`), on httptools.

``wsgi.app`` is the same idea as a WSGI app, for gunicorn.
"""
