"""``python -m flypool.example``: run the example worker."""

from flypool.example.server import main

raise SystemExit(main())
