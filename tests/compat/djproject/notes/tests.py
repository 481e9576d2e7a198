"""Tests that use the test database: each class is a separate unit for --parallel."""
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.test import TestCase, TransactionTestCase

from .models import Note


class NoteTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        Note.objects.create(title="first", votes=1)

    def test_reads_what_setup_wrote(self):
        self.assertEqual(Note.objects.get(title="first").votes, 1)

    def test_update_in_place(self):
        Note.objects.filter(title="first").update(votes=F("votes") + 41)
        self.assertEqual(Note.objects.get(title="first").votes, 42)

    def test_unique_violation_rolls_back_to_the_savepoint(self):
        with self.assertRaises(IntegrityError), transaction.atomic():
            Note.objects.create(title="first")
        self.assertEqual(Note.objects.count(), 1)


class NoteTransactionTests(TransactionTestCase):
    def test_commit_is_visible(self):
        with transaction.atomic():
            Note.objects.create(title="committed", votes=3)
        self.assertEqual(Note.objects.get(title="committed").votes, 3)

    def test_runs_in_the_test_database(self):
        with connection.cursor() as c:
            c.execute("SELECT current_database()")
            name = c.fetchone()[0]
        self.assertTrue(name.startswith("test_"), name)

    def test_each_test_starts_empty(self):
        self.assertEqual(Note.objects.count(), 0)
        Note.objects.bulk_create([Note(title=f"n{i}") for i in range(10)])
        self.assertEqual(Note.objects.count(), 10)
