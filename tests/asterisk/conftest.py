"""The real-Asterisk suite's fixtures.

Where the kit (``../shared/asterisk``) is missing, every test here is skipped with one
reason, reported by ``-ra`` as a single line; with ``CALLROUTE_REQUIRE_ASTERISK=1`` (CI)
a missing kit is an error instead.
"""

from __future__ import annotations

import pytest

from tests.asterisk.harness import kit_problem, kit_required


@pytest.fixture(scope="session")
def asterisk_kit() -> None:
    """The kit is usable; otherwise skip (or fail, when it is required)."""
    problem = kit_problem()
    if problem is None:
        return
    if kit_required():
        pytest.fail(problem.replace("skipped", "cannot run"), pytrace=False)
    pytest.skip(problem)


@pytest.fixture(autouse=True)
def _needs_kit(asterisk_kit: None) -> None:
    """Every test of this suite needs the kit."""
