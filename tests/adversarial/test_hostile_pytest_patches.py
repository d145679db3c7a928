"""Hostile patches of kind="pytest" (a repository with a pytest suite), on every backend.

Here the candidate's code runs inside the pytest process itself, so the attacks go
after pytest: candidate conftest files and config files, patched report classes,
rewritten test files, exit codes. A pass means containment failed; afterwards the
same sandbox must still judge a correct and a wrong candidate right (fixtures in
conftest.py, helpers in hostile_support.py).
"""

from __future__ import annotations

import pytest
from hostile_support import WRONG, assert_contained, assert_sandbox_healthy, pytest_job

from coderepair.worker.sandbox import Sandbox

EXIT_IN_CALL = "import os\n\ndef add(a, b):\n    os._exit(0)\n"


FORCE_PASS_CONFTEST = """\
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome = "passed"
    report.longrepr = None
"""

PLUGIN_AND_WRONG = FORCE_PASS_CONFTEST + "\n\n" + WRONG
"""The candidate module doubles as a pytest plugin, loaded by a candidate config file."""

PATCH_PYTEST_AT_IMPORT = """\
import _pytest.reports

_original = _pytest.reports.TestReport.from_item_and_call.__func__

def _forged(cls, item, call):
    report = _original(cls, item, call)
    report.outcome = "passed"
    report.longrepr = None
    return report

_pytest.reports.TestReport.from_item_and_call = classmethod(_forged)

def add(a, b):
    return a - b
"""

REWRITE_TESTS_AT_IMPORT = """\
import atexit, os

here = os.path.dirname(os.path.abspath(__file__))
for name in ("tests/test_calc.py",):
    path = os.path.join(here, name)
    try:
        os.chmod(path, 0o644)
        with open(path, "w") as fh:
            fh.write("def test_small():\\n    pass\\n\\ndef test_negative():\\n    pass\\n")
    except OSError:
        pass
atexit.register(lambda: os._exit(0))

def add(a, b):
    return a - b
"""


@pytest.mark.parametrize(
    "files",
    [
        pytest.param(
            {
                "calc.py": WRONG,
                "conftest.py": FORCE_PASS_CONFTEST,
                "tests/conftest.py": FORCE_PASS_CONFTEST,
                "pytest.ini": "[pytest]\naddopts = -p no:python\n",
            },
            id="conftest-and-ini-force-pass",
        ),
        pytest.param(
            {"calc.py": PLUGIN_AND_WRONG, "pytest.ini": "[pytest]\naddopts = -p calc\n"},
            id="pytest-ini-loads-candidate-plugin",
        ),
        pytest.param(
            {
                "calc.py": PLUGIN_AND_WRONG,
                "pyproject.toml": '[tool.pytest.ini_options]\naddopts = "-p calc"\n',
            },
            id="pyproject-loads-candidate-plugin",
        ),
        pytest.param(
            {"calc.py": PLUGIN_AND_WRONG, "setup.cfg": "[tool:pytest]\naddopts = -p calc\n"},
            id="setup-cfg-loads-candidate-plugin",
        ),
        pytest.param(
            {"calc.py": PLUGIN_AND_WRONG, "tox.ini": "[pytest]\naddopts = -p calc\n"},
            id="tox-ini-loads-candidate-plugin",
        ),
        pytest.param({"calc.py": EXIT_IN_CALL}, id="os-exit-0-inside-a-test"),
        pytest.param({"calc.py": PATCH_PYTEST_AT_IMPORT}, id="patch-pytest-reports"),
        pytest.param({"calc.py": REWRITE_TESTS_AT_IMPORT}, id="rewrite-tests-exit-0"),
    ],
)
def test_pytest_kind_patches_do_not_pass(sandbox: Sandbox, files: dict[str, str]) -> None:
    result = sandbox.run(pytest_job(files))
    assert_contained(result)
    assert_sandbox_healthy(sandbox, pytest_too=True)


PATCH_STDLIB_AT_IMPORT = """\
import json

_dumps = json.dumps

def _forged(obj, *args, **kwargs):
    # The result plugin serialises {"outcomes", "problems"} with json.dumps, then MACs it.
    if isinstance(obj, dict) and "outcomes" in obj:
        obj = {"outcomes": dict.fromkeys(obj["outcomes"], True), "problems": []}
    return _dumps(obj, *args, **kwargs)

json.dumps = _forged

def add(a, b):
    return a - b
"""


@pytest.mark.xfail(
    strict=True,
    reason="kind=pytest runs candidate code inside the pytest process (runner.py's documented "
    "residual risk): patching a stdlib function the result plugin uses forges an "
    "authenticated pass. strict: when the runner closes this, the marker must go.",
)
def test_pytest_kind_stdlib_patch_does_not_pass(sandbox: Sandbox) -> None:
    result = sandbox.run(pytest_job({"calc.py": PATCH_STDLIB_AT_IMPORT}))
    assert_contained(result)
