"""GeoDjango with verified TLS: ``"ENGINE": "secure_pg_backend.postgis"``.

Django's PostGIS backend with the whole ``secure_pg_backend`` policy on top (see
``base.DatabaseWrapper``). The other modules re-export Django's, so code that imports
``<ENGINE>.operations`` and the like finds what it would find under Django's ENGINE.
"""

__all__ = []
