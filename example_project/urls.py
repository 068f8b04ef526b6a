from importlib.util import find_spec

from django.conf import settings
from django.urls import URLPattern, URLResolver, include, path
from django.views.generic import RedirectView

from . import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("", RedirectView.as_view(pattern_name="tls")),
    path("tls/", views.tls, name="tls"),
]

# Operations endpoints, when their packages are installed (both are in the dev extra).
if find_spec("health_check"):
    from health_check.views import HealthCheckView

    from secure_pg_backend.contrib.health_check import VerifiedTLS

    ours = [a for a, db in settings.DATABASES.items() if db["ENGINE"] == "secure_pg_backend"]
    checks = [(VerifiedTLS, {"alias": alias}) for alias in ours]
    urlpatterns.append(path("health/", HealthCheckView.as_view(checks=checks), name="health"))
if find_spec("django_prometheus"):
    urlpatterns.append(path("", include("django_prometheus.urls")))  # /metrics
