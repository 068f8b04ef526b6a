from django.urls import path
from django.views.generic import RedirectView

from . import views

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="tls")),
    path("tls/", views.tls, name="tls"),
]
