"""Django's PostGIS ``operations`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.operations import (
    BILATERAL,
    PostGISOperations,
    PostGISOperator,
    ST_Polygon,
)

__all__ = ["BILATERAL", "PostGISOperations", "PostGISOperator", "ST_Polygon"]
