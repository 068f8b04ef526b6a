"""Settings for the example project, read from the environment (twelve-factor style).

``DATABASE_URL`` (dj-database-url, ``pip install secure-pg-backend[url]``) configures
``default``; ``DATABASE_URL_<NAME>`` adds the alias ``<name>``. Without ``DATABASE_URL``
the ``DB_HOST``, ``DB_PORT``, ``DB_NAME``, ``DB_USER``, ``DB_PASSWORD`` and
``DB_SSLROOTCERT`` variables are used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent
ENGINE = "secure_pg_backend"

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-insecure-key-for-local-demo")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", *os.environ.get("DJANGO_ALLOWED_HOSTS", "").split()]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "secure_pg_backend",  # system checks, `manage.py dbtls`, Prometheus metrics
]
# /health/ (django-health-check) and /metrics (django-prometheus) when installed; see urls.py.
INSTALLED_APPS += [app for app in ("health_check", "django_prometheus") if find_spec(app)]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "example_project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,  # health_check's HTML page
        "OPTIONS": {},
    }
]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _from_url(url: str) -> dict[str, Any]:
    try:
        import dj_database_url
    except ImportError as exc:
        raise ImproperlyConfigured(
            "DATABASE_URL is set but dj-database-url is not installed; "
            "pip install 'secure-pg-backend[url]' or use the DB_* variables."
        ) from exc
    entry: dict[str, Any] = dict(dj_database_url.parse(url, engine=ENGINE))
    return entry


def databases_from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    if env.get("DATABASE_URL"):
        databases = {"default": _from_url(env["DATABASE_URL"])}
    else:
        options = {"sslrootcert": env["DB_SSLROOTCERT"]} if env.get("DB_SSLROOTCERT") else {}
        databases = {
            "default": {
                "ENGINE": ENGINE,
                "HOST": env.get("DB_HOST", "localhost"),
                "PORT": env.get("DB_PORT", "5432"),
                "NAME": env.get("DB_NAME", "app"),
                "USER": env.get("DB_USER", "app"),
                "PASSWORD": env.get("DB_PASSWORD", ""),
                "OPTIONS": options,
            }
        }
    for key in sorted(env):
        if key.startswith("DATABASE_URL_") and env[key]:
            databases[key.removeprefix("DATABASE_URL_").lower()] = _from_url(env[key])
    return databases


DATABASES = databases_from_env(os.environ)

# The backend's start-up line ("database alias 'default' connected to … with TLSv1.3 …")
# goes to the console; the message already starts with "secure_pg_backend:".
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "secure_pg_backend": {"handlers": ["console"], "level": "INFO", "propagate": False}
    },
}
