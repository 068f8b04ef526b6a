"""Minimal settings so mypy's django-stubs plugin can load Django."""

SECRET_KEY = "typecheck"
INSTALLED_APPS = ["secure_pg_backend"]
DATABASES = {"default": {"ENGINE": "secure_pg_backend", "NAME": "x", "HOST": "db.test"}}
