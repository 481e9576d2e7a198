"""Django + psycopg 3 through pgvalve in transaction mode: many clients, few server connections.

Run by tests/it/compat.rs (which creates the virtualenv and starts PostgreSQL and pgvalve):
    python django_compat.py HOST PORT DBNAME USER PASSWORD THREADS

Every thread has its own Django connection (Django connections are per thread) and checks
that every result is the one it asked for: ORM CRUD, transaction.atomic with rollback,
select_for_update, bulk_create, .iterator() (a WITH HOLD server-side cursor), and psycopg 3
server-side prepared statements (prepare_threshold=1). Exits non-zero on any wrong result or
error; prints one JSON line of counts.
"""
import json
import sys
import threading
import traceback

import django
from django.conf import settings

HOST, PORT, NAME, USER, PASSWORD, THREADS = sys.argv[1:7]
THREADS = int(THREADS)

settings.configure(
    DEBUG=False,
    USE_TZ=True,
    INSTALLED_APPS=[],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": HOST,
            "PORT": PORT,
            "NAME": NAME,
            "USER": USER,
            "PASSWORD": PASSWORD,
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"application_name": "django-compat", "prepare_threshold": 1},
        }
    },
)
django.setup()

from django.db import connection, models, transaction  # noqa: E402


class Item(models.Model):
    owner = models.IntegerField(db_index=True)
    name = models.CharField(max_length=64)
    qty = models.IntegerField(default=0)

    class Meta:
        app_label = "compat"


class Rollback(Exception):
    pass


counts = {"ok": 0, "wrong": 0, "errors": 0}
lock = threading.Lock()
first_error = []


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def worker(me):
    try:
        # CRUD
        obj = Item.objects.create(owner=me, name=f"item-{me}", qty=1)
        got = Item.objects.get(pk=obj.pk)
        check(got.owner == me and got.name == f"item-{me}", f"get returned {got.owner}/{got.name}")
        Item.objects.filter(pk=obj.pk).update(qty=5)
        check(Item.objects.get(pk=obj.pk).qty == 5, "update lost")
        # transaction.atomic with rollback
        try:
            with transaction.atomic():
                Item.objects.create(owner=me, name="rolled-back", qty=0)
                raise Rollback()
        except Rollback:
            pass
        check(not Item.objects.filter(owner=me, name="rolled-back").exists(), "rollback leaked a row")
        # select_for_update inside a transaction
        with transaction.atomic():
            locked = Item.objects.select_for_update().get(pk=obj.pk)
            locked.qty += 1
            locked.save()
        check(Item.objects.get(pk=obj.pk).qty == 6, "select_for_update update lost")
        # bulk_create
        Item.objects.bulk_create([Item(owner=me, name=f"bulk-{me}-{i}", qty=i) for i in range(10)])
        check(Item.objects.filter(owner=me, name__startswith="bulk-").count() == 10, "bulk_create count")
        # the same query many times: psycopg prepares it server-side (prepare_threshold=1)
        for i in range(10):
            total = Item.objects.filter(owner=me, name__startswith="bulk-").aggregate(s=models.Sum("qty"))["s"]
            check(total == 45, f"prepared aggregate returned {total}")
        # .iterator(): a server-side cursor WITH HOLD (pins this session until it closes)
        names = sorted(i.name for i in Item.objects.filter(owner=me).iterator(chunk_size=3))
        check(len(names) == 11 and all(n.endswith(str(me)) or n.startswith(f"bulk-{me}-") for n in names),
              f"iterator returned {names[:3]}...")
        Item.objects.filter(owner=me).delete()
        check(not Item.objects.filter(owner=me).exists(), "delete")
        with lock:
            counts["ok"] += 1
    except AssertionError as e:
        with lock:
            counts["wrong"] += 1
            first_error.append(f"thread {me}: wrong result: {e}")
    except Exception:
        with lock:
            counts["errors"] += 1
            first_error.append(f"thread {me}: {traceback.format_exc()}")
    finally:
        connection.close()


def main():
    with connection.schema_editor() as editor:
        editor.create_model(Item)
    connection.close()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(counts))
    if first_error:
        print(first_error[0], file=sys.stderr)
    sys.exit(0 if counts["ok"] == THREADS else 1)


main()
