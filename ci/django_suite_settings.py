"""Settings for Django's own test suite (its tests/runtests.py) on this project's ENGINEs.

scripts/django-suite runs ``runtests.py --settings=django_suite_settings`` with this directory
on PYTHONPATH. Everything but the databases and the test runner comes from the suite's own
default settings of the same Django version (tests/test_sqlite.py), so a new Django release's
defaults apply without a copy here. The DATABASES (a throwaway TLS server's ``default`` and
``other`` aliases) come from the script, as JSON in SPB_DJANGO_SUITE_DATABASES.
"""

import json
import os

from test_sqlite import *  # noqa: F403  (runtests.py puts its own directory first on sys.path)

DATABASES = json.loads(os.environ["SPB_DJANGO_SUITE_DATABASES"])

# Records every test's outcome as JSON for the script, instead of parsing the console output.
TEST_RUNNER = "django_suite_runner.RecordingRunner"
