"""callroute: CRM-aware call routing for Asterisk.

``router`` is the core. Its front door assembles and runs the service (``app``, ``cli``,
``admin``, ``demo``, ``samplecrm``) on top of the shared basics (``settings``, ``errors``,
``models``, ``metrics``, ``log``, ``keys``, ``phone``, ``runner``) and of wings that follow
a call's path: ``lookup`` (who is calling), ``rules`` (where the call goes), ``records``
(what the CRM is told afterwards), ``crm`` (how the CRM is reached), ``web`` (the
agent and supervisor pages) and ``auth`` (roles, users, the access check of every
route). The FastAGI side is the ``dialplan`` package, the AMI side the ``ami`` package.
Wings import the basics, never the front door; only the front door imports
``dialplan`` and ``ami``.
"""

__version__ = "0.1.0"
