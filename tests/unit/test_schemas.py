"""The shipped DDL: one file per migration number, applied in the order of their numbers."""

from __future__ import annotations

from processors.store import migrations


def test_each_migration_has_a_number_of_its_own() -> None:
    versions = [v for v, _name, _sql in migrations()]
    assert versions == sorted(set(versions)) and versions[0] == 1
