"""The real-Asterisk kit the suite runs on."""

from __future__ import annotations

import os

from tests.asterisk.harness import kit_dir


def test_the_asterisk_kit_is_there(asterisk_kit: None) -> None:
    """The kit's start script is present and executable (where it is not, this test is
    the suite's one skip line, or its failure when CALLROUTE_REQUIRE_ASTERISK=1)."""
    assert os.access(kit_dir() / "asterisk", os.X_OK)
