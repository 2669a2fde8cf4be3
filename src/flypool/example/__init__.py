"""flypool's bundled example worker: ``python -m flypool.example`` (see `server`).

Standard library only; ``wsgi.app`` is the same idea as a WSGI app for gunicorn.
"""
