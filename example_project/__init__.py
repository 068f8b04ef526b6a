"""A small Django project that uses secure_pg_backend; ``python -m example_project.demo``."""
