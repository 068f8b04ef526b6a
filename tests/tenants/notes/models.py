from django.db import models


class Note(models.Model):  # lives in each tenant's schema
    text = models.CharField(max_length=200)
