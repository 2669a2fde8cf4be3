"""Entry point of the preload test app: ``python -m preload_serve SOCKET``.

Kept apart from ``preload_app`` on purpose: the module a command runs as
``__main__`` is executed afresh in every worker (as ``python -m`` does), so
the heavy imports must live in a module it imports, which the preloader
imported already.
"""

from preload_app import main  # type: ignore[import-not-found]  # a sibling in the release

if __name__ == "__main__":
    main()
