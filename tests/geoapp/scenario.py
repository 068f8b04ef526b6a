"""A GeoDjango user's first steps over secure_pg_backend.postgis; prints JSON for the test."""

import json

import django

django.setup()

from django.contrib.gis.db.models.functions import Distance  # noqa: E402
from django.contrib.gis.geos import Point, Polygon  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402

from tests.geoapp.models import City  # noqa: E402

call_command("migrate", "geoapp", verbosity=0)
City.objects.bulk_create(
    [
        City(name="Paris", location=Point(2.35, 48.86, srid=4326)),
        City(name="Berlin", location=Point(13.40, 52.52, srid=4326)),
        City(name="Lisbon", location=Point(-9.14, 38.72, srid=4326)),
    ]
)
box = Polygon.from_bbox((0.0, 45.0, 15.0, 55.0))  # western central Europe
box.srid = 4326
paris = City.objects.get(name="Paris").location
berlin = City.objects.annotate(d=Distance("location", paris)).get(name="Berlin")
with connection.cursor() as cursor:
    cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    (server_ssl,) = cursor.fetchone()
print(
    json.dumps(
        {
            "within": sorted(
                City.objects.filter(location__within=box).values_list("name", flat=True)
            ),
            "paris_berlin_km": round(berlin.d.km),
            "berlin_location": berlin.location.coords,
            "postgis": connection.ops.postgis_lib_version(),
            "display_name": connection.display_name,
            "wrapper": type(connections["default"]).__module__,
            "tls": connection.tls_info.as_dict(),
            "server_ssl": server_ssl,
        }
    )
)
