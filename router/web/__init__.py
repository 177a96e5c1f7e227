"""What people see: the agent's screen pop and the supervisor's live view.

Pages (plain HTML/JS/CSS in ``static/``, no build step) served by the admin HTTP server,
with the live state pushed to them over WebSocket. ``decisions`` keeps each call's
routing decision from FastAGI time until its phone rings; ``live`` turns AMI events into
cards (per agent) and the live view; ``wrapup`` holds an answered call's record for the
agent's disposition (or sends a later one as an update of the CRM's activity);
``pending`` keeps each agent's list of calls still awaiting a disposition;
``history`` keeps callroute's own call summaries and daily figures in Redis (encrypted
at rest, as wrapup and pending are: ``router.crypto.seal_json``); ``audit`` writes the
pages' customer reads to the audit trail behind the push;
``routes`` puts it all on the admin server, each route with its access rule.

May import the shared basics of ``router``, ``router.auth``, and read from the
``lookup``, ``rules`` and ``records`` wings and ``ami``'s event types; it is assembled
into the service by ``router.app`` and never imported by the wings themselves.
"""
