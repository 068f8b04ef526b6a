"""Django's PostGIS ``pgraster`` module, re-exported under this ENGINE."""

from django.contrib.gis.db.backends.postgis.pgraster import (
    chunk,
    from_pgraster,
    pack,
    to_pgraster,
    unpack,
)

__all__ = ["chunk", "from_pgraster", "pack", "to_pgraster", "unpack"]
