"""Settings for the GeoDjango run (tests/test_postgis.py starts it in a subprocess).

GeoDjango models cannot live in the main test settings, whose database is not PostGIS.
The DATABASES entry comes from the parent test, as JSON in SPB_GEO_DATABASE.
"""

import json
import os

DATABASES = {"default": json.loads(os.environ["SPB_GEO_DATABASE"])}
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.gis",
    "secure_pg_backend",
    "tests.geoapp",
]
USE_TZ = True
SECRET_KEY = "tests-not-secret"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
