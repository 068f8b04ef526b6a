"""A user-side ENGINE: django-prometheus' metrics with secure_pg_backend's policy on top.

``"ENGINE": "tests.prometheus_engine"`` (docs/recipes.md shows the same module).
"""
