"""The real-Asterisk suite's fixtures and its one-line skip.

Where the kit (``../shared/asterisk``, or ``$CALLROUTE_ASTERISK_KIT``) is missing, as in a
user's clone, the suite's modules are not collected and ``test_kit.py`` reports the one
skip, with the reason; with ``CALLROUTE_REQUIRE_ASTERISK=1`` (CI) a missing kit fails
every test of the suite instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.asterisk.harness import kit_problem, kit_required


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without the kit (and not required), only test_kit.py is collected here."""
    if (collection_path.name.startswith("test_") and collection_path.name != "test_kit.py"
            and kit_problem() is not None and not kit_required()):
        return True
    return None


@pytest.fixture(scope="session")
def asterisk_kit() -> None:
    """The kit is usable; otherwise skip (or fail, when it is required)."""
    problem = kit_problem()
    if problem is None:
        return
    if kit_required():
        pytest.fail(problem.replace("skipped", "cannot run"), pytrace=False)
    pytest.skip(problem)
