"""Django's PostGIS ``introspection`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.introspection import PostGISIntrospection

__all__ = ["PostGISIntrospection"]
