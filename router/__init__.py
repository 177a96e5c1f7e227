"""callroute: CRM-aware call routing for Asterisk.

Packages: ``router`` (settings, numbers, CRM, cache, rules, outbox, admin API, CLI),
``dialplan`` (FastAGI), ``ami`` (Asterisk Manager Interface: call tracking and records).
"""

__version__ = "0.1.0"
