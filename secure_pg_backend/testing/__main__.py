"""``python -m secure_pg_backend.testing``: the dev server (``testing.devserver``)."""

from .devserver import main

__all__ = []

raise SystemExit(main())
