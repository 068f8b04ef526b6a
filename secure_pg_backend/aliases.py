"""A wrapper for a DATABASES entry outside Django's ``connections``: what the system checks
and ``dbshell`` judge settings with, without touching the process's connections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.utils import ConnectionHandler

__all__ = ["standalone_wrapper"]


def standalone_wrapper(alias: str, settings_dict: Mapping[str, Any]) -> Any:
    """The wrapper Django would build for a DATABASES entry, outside ``connections``.

    For judging settings (system checks, dbshell) without touching the process's
    connections; nothing is opened. Django fills in its defaults on a copy.
    """
    entry = {**settings_dict, "TEST": dict(settings_dict.get("TEST") or {})}
    handler = ConnectionHandler(
        {DEFAULT_DB_ALIAS: {"ENGINE": "django.db.backends.dummy"}, alias: entry}
    )
    return handler[alias]
