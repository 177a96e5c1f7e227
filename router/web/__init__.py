"""What people see: the agent's screen pop and the supervisor's live view.

Pages (plain HTML/JS/CSS, no build step) served by the admin HTTP server, with the live
state pushed to them. May import the shared basics of ``router`` and read from the
``lookup``, ``rules`` and ``records`` wings; it is assembled into the service by
``router.app`` and never imported by the wings themselves.
"""
