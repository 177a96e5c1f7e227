"""Where a call goes: the routing rules and what they look at.

``spec`` is the rules file as written (the YAML model and its validation, with error
messages that name the rule and field), ``compiler`` turns it into checks and routes,
and ``decide`` applies them to a call (:class:`~router.rules.decide.RuleSet`) and builds
the channel variables the dialplan acts on. ``schedule`` (business hours, holidays),
``presence`` (agent device states) and ``ruleswatch`` (reload on change, keep the last
good rules) serve them. Pure decisions, no network I/O: may import only the shared
basics of ``router`` (settings, errors, models, phone).
"""
