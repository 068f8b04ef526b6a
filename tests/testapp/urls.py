from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

from .models import Note


def tls(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"protocol": connection.tls_info.protocol, "notes": Note.objects.count()})


urlpatterns = [path("tls/", tls)]
