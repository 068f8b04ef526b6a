"""The benchmark: secure_pg_backend against the stock backend (run.py is the driver)."""
