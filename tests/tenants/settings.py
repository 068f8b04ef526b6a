"""Settings for the django-tenants run (tests/test_composition_tenants.py, in a subprocess).

django-tenants needs its apps, router and ENGINE in the settings, which the main test
settings cannot carry. The secure_pg_backend entry comes from the parent test, as JSON in
SPB_TENANTS_DATABASE; django-tenants' ENGINE wraps it through ORIGINAL_BACKEND.
"""

import json
import os

DATABASES = {
    "default": {
        **json.loads(os.environ["SPB_TENANTS_DATABASE"]),
        "ENGINE": "django_tenants.postgresql_backend",
    }
}
ORIGINAL_BACKEND = "secure_pg_backend"
DATABASE_ROUTERS = ("django_tenants.routers.TenantSyncRouter",)
SHARED_APPS = [
    "django_tenants",
    "django.contrib.contenttypes",
    "secure_pg_backend",
    "tests.tenants.customers",
]
TENANT_APPS = ["django.contrib.contenttypes", "tests.tenants.notes"]
INSTALLED_APPS = SHARED_APPS + [app for app in TENANT_APPS if app not in SHARED_APPS]
TENANT_MODEL = "customers.Client"
TENANT_DOMAIN_MODEL = "customers.Domain"
USE_TZ = True
SECRET_KEY = "tests-not-secret"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
