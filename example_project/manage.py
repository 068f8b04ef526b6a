#!/usr/bin/env python
"""``python example_project/manage.py <command>`` from the repository root (or anywhere)."""

import os
import sys
from pathlib import Path


def main() -> None:
    # The project is a package next to this file; make it importable from any directory.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
