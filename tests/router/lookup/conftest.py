"""Fixtures of the cache and lookup tests, for every module here: ``crm`` (the loopback CRM
of :mod:`tests.router.lookup.cache_crm`), ``directory`` (an HTTP directory in front of it),
``redis`` (a client of the flushed test Redis) and ``no_gc``.

The outbox tests use a CRM of their own: their modules import ``crm_fixture`` from
:mod:`tests.router.records.outbox_crm`, and a fixture a module imports overrides this one.
"""

from tests.router.lookup.cache_crm import (  # noqa: F401  (fixtures)
    crm_fixture,
    directory_fixture,
    no_gc_fixture,
    redis_fixture,
)
