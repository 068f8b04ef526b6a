from django.contrib.gis.db import models


class City(models.Model):
    name = models.CharField(max_length=100)
    location = models.PointField(srid=4326)
