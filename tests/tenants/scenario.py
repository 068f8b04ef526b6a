"""A django-tenants user's first steps with ORIGINAL_BACKEND = "secure_pg_backend"; prints JSON."""

import json

import django

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django_tenants.utils import schema_context, tenant_context  # noqa: E402

from tests.tenants.customers.models import Client  # noqa: E402
from tests.tenants.notes.models import Note  # noqa: E402


def session() -> dict[str, object]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        schema, ssl = cursor.fetchone()
    return {"schema": schema, "server_ssl": ssl}


call_command("migrate_schemas", shared=True, verbosity=0)
with schema_context("public"):
    acme = Client.objects.create(schema_name="acme", name="Acme")  # creates + migrates the schema
    Client.objects.create(schema_name="globex", name="Globex")
with tenant_context(acme):
    Note.objects.create(text="only in acme")
    acme_view = {"notes": list(Note.objects.values_list("text", flat=True)), **session()}
with tenant_context(Client.objects.get(schema_name="globex")):
    globex_view = {"notes": Note.objects.count(), **session()}
print(
    json.dumps(
        {
            "acme": acme_view,
            "globex": globex_view,
            "wrapper_mro": [cls.__module__ for cls in type(connections["default"]).__mro__],
            "tls": connection.tls_info.as_dict(),
        }
    )
)
