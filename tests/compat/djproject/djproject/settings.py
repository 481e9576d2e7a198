"""Settings of the test project: one PostgreSQL database, reached through pgvalve.

Where pgvalve listens comes from the environment (PGVALVE_HOST, PGVALVE_PORT, PGVALVE_DB,
PGVALVE_USER, PGVALVE_PASSWORD); the role needs CREATEDB for the test databases.
"""
import os

SECRET_KEY = "pgvalve-compat-not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["notes"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGVALVE_HOST", "127.0.0.1"),
        "PORT": os.environ.get("PGVALVE_PORT", "6432"),
        "NAME": os.environ.get("PGVALVE_DB", "app"),
        "USER": os.environ.get("PGVALVE_USER", "app"),
        "PASSWORD": os.environ.get("PGVALVE_PASSWORD", ""),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"application_name": "django-test-runner"},
    }
}
