"""WSGI entry point: ``gunicorn example_project.wsgi`` with ``DATABASE_URL`` set.

With ``--preload`` the app is imported once in gunicorn's master and the workers are forked
from it; see docs/lifecycle.md for what the backend does at that fork.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

application = get_wsgi_application()
