"""Settings for ``manage.py check --deploy`` (tests/test_deploy_check.py): one alias on this
ENGINE and, next to it, every kind of PostgreSQL alias the policy does not cover, plus one
that is not PostgreSQL at all. Nothing connects: the checks read settings only."""

SECRET_KEY = "deploy-check-test-only-" + "x" * 40
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "secure_pg_backend"]
USE_TZ = True


def _entry(engine: str, **options: object) -> dict[str, object]:
    return {"ENGINE": engine, "HOST": "db.example.com", "NAME": "app", "OPTIONS": options}


DATABASES = {
    "default": _entry("secure_pg_backend", sslrootcert="system"),
    # Left over from before the switch: libpq would try TLS, then fall back to plaintext.
    "legacy": _entry("django.db.backends.postgresql", sslmode="prefer"),
    "geo": _entry("django.contrib.gis.db.backends.postgis"),
    "vendor": _entry("tests.thirdparty_backend"),
    # Covered: the PostGIS ENGINE of this package, and a wrapper composed with the mixin.
    "geo_ok": _entry("secure_pg_backend.postgis", sslrootcert="system"),
    "composed": _entry("tests.mixin_backend", sslrootcert="system"),
    "local": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
