"""Fixtures of the coordinator service tests; the helpers live in `service_support`.

Test modules import helpers from `service_support`, never from `conftest`: in a whole-suite
run, ``conftest`` names whichever conftest module pytest loaded first.
"""

from service_support import assets, keys, service_assets

__all__ = ["assets", "keys", "service_assets"]
