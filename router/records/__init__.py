"""What the CRM is told after a call: durable, exactly-once delivery of call records.

``outbox`` stores each finished call's record in a Redis Stream (``spool`` on local disk
when Redis is down), ``delivery`` posts them to the CRM with retries, backoff and a
dead-letter list, paced by ``ratelimit``; ``outbox_cli`` is ``callroute outbox``
(status, list, retry, replay). May import the shared basics of ``router`` and the CRM
interface (``router.crm.base``); nothing from ``lookup``, ``rules``, ``dialplan`` or
``ami`` (records arrive as plain data from the AMI side through the front door).
"""
