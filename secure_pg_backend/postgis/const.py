"""Django's PostGIS ``const`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.const import (
    BANDTYPE_FLAG_HASNODATA,
    BANDTYPE_PIXTYPE_MASK,
    GDAL_TO_POSTGIS,
    GDAL_TO_STRUCT,
    POSTGIS_HEADER_STRUCTURE,
    POSTGIS_TO_GDAL,
    STRUCT_SIZE,
)

__all__ = [
    "BANDTYPE_FLAG_HASNODATA",
    "BANDTYPE_PIXTYPE_MASK",
    "GDAL_TO_POSTGIS",
    "GDAL_TO_STRUCT",
    "POSTGIS_HEADER_STRUCTURE",
    "POSTGIS_TO_GDAL",
    "STRUCT_SIZE",
]
