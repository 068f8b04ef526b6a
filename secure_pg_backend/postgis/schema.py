"""Django's PostGIS ``schema`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.schema import PostGISSchemaEditor

__all__ = ["PostGISSchemaEditor"]
