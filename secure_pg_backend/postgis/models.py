"""Django's PostGIS ``models`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.models import (
    PostGISGeometryColumns,
    PostGISSpatialRefSys,
)

__all__ = ["PostGISGeometryColumns", "PostGISSpatialRefSys"]
