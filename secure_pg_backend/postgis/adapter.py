"""Django's PostGIS ``adapter`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.adapter import PostGISAdapter

__all__ = ["PostGISAdapter"]
