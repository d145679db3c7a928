"""Fixtures of the storage unit tests; the helpers live in `storage_support`.

Test modules import helpers from `storage_support`, never from `conftest`: in a whole-suite
run, ``conftest`` names whichever conftest module pytest loaded first.
"""

from storage_support import storage_db, storage_world

__all__ = ["storage_db", "storage_world"]
