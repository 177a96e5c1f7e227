"""How the CRM is reached: the connector that looks customers up and posts call records.

``base`` holds the interfaces the other wings use (``CustomerDirectory`` for lookups,
``RecordSink`` for call records), ``config`` the connector's configuration language,
``mapping`` the templates and field maps, ``http`` the HTTP client (auth, TLS, timeouts,
errors translated into ``router.errors``), ``send`` one configured request sent and its
answer checked, ``rest`` the generic REST connector. May
import only the shared basics of ``router``.
"""
