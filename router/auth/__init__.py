"""Who may do what: roles, users and their tokens, sign-in sessions, the access check of
every HTTP route, and the ``callroute users`` command.

``roles`` is the role model (viewer < agent < supervisor < engineer < admin and the
permissions each holds; an agent is bound to its own agent id); ``users`` stores users
with scrypt-hashed tokens (Redis, or a JSON file) and answers "whose token is this" in
constant time; ``sessions`` signs the pages' sign-in cookie; ``access`` is the aiohttp
middleware that turns a request into a :class:`~router.auth.roles.Principal` or a
401/403 and refuses any route that declares no access rule; ``users_cli`` is ``callroute
users``. May import the shared basics of ``router`` (the audit trail and the key ring
among them); nothing from ``lookup``, ``rules``, ``records``, ``web``, ``dialplan`` or
``ami``. The front door and the ``web`` wing import it.
"""
