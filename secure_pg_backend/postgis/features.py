"""Django's PostGIS ``features`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.features import DatabaseFeatures

__all__ = ["DatabaseFeatures"]
