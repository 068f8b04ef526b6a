"""URLs for the operations tests: django-health-check's view and django-prometheus' /metrics."""

from django.urls import include, path
from health_check.views import HealthCheckView

from secure_pg_backend.contrib.health_check import VerifiedTLS

# The tests add these aliases (pointing at the good, expiring and MITM servers).
ALIASES = ("ops_good", "ops_expiring", "ops_refused")

urlpatterns = [
    *(
        path(f"health/{alias}/", HealthCheckView.as_view(checks=[(VerifiedTLS, {"alias": alias})]))
        for alias in ALIASES
    ),
    path(
        "health/relaxed/",
        HealthCheckView.as_view(checks=[(VerifiedTLS, {"alias": "ops_expiring", "warn_days": 5})]),
    ),
    path("", include("django_prometheus.urls")),
]
