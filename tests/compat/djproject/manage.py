#!/usr/bin/env python
"""A tiny Django project whose test suite runs through pgvalve (tests/it/compat.rs).

    PGVALVE_HOST=127.0.0.1 PGVALVE_PORT=6432 PGVALVE_DB=app PGVALVE_USER=app \
    PGVALVE_PASSWORD=secret python manage.py test --noinput [--parallel 2]

Django's test runner creates test_<db> (connected to "postgres"), runs the tests in it (with
--parallel 2 it clones it first: CREATE DATABASE test_<db>_1 TEMPLATE test_<db>), then drops
every test database, again from "postgres".
"""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
