"""Who is calling: the customer lookup of the call path.

``base`` is the interface the route handler sees (:class:`~router.lookup.base.Lookup`);
``cached_lookup`` implements it over the CRM connector with a two-level cache
(``cache``: in-process LRU + Redis, writes behind), single-flight, a deadline and a
circuit breaker (``breaker``). The cache is kept true by an invalidation feed between
instances (``cachefeed``), the CRM's change webhooks (``webhook``) and pre-warming from
its changed-customers feed (``sync``). May import the shared basics of ``router`` and
the CRM interface (``router.crm.base``); nothing from ``rules``, ``records``,
``dialplan`` or ``ami``.
"""
