"""Every async test of the FastAGI side runs twice: on asyncio's own loop and on uvloop.

``callroute serve`` runs on uvloop when it is installed (:mod:`router.runner`), and on
the stock loop otherwise; the two differ in ways that matter here (uvloop's transports
are not ``asyncio.Transport`` subclasses, callbacks run in another order), so the server
is proven on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, object]:
    """The loops each async test of this package runs on."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}

