"""Agent presence: which agents' devices are free, as the AMI client last saw them.

The AMI side feeds ``DeviceStateChange`` (and queue member status) into a
:class:`Presence`; routing rules ask it whether an owner's device can take a call.
An agent never seen is "unknown", which rules treat as available: presence can
only skip an agent known to be busy or unreachable, never strand a call.
"""

from __future__ import annotations

import time

#: Asterisk device states in which a new call can ring the device.
AVAILABLE = frozenset({"NOT_INUSE", "IDLE"})
#: States in which ringing the device is pointless.
UNAVAILABLE = frozenset({"INUSE", "BUSY", "UNAVAILABLE", "INVALID", "RINGING", "RINGINUSE",
                         "ONHOLD"})

#: Asterisk's device states by number (``enum ast_device_state``): a queue member's
#: ``Status`` in ``QueueMember`` and ``QueueMemberStatus`` events.
DEVICE_STATES = ("UNKNOWN", "NOT_INUSE", "INUSE", "BUSY", "INVALID", "UNAVAILABLE",
                 "RINGING", "RINGINUSE", "ONHOLD")
_BY_NUMBER = {str(number): state for number, state in enumerate(DEVICE_STATES)}


def member_state(status: str | None) -> str | None:
    """The device state name of a queue member's ``Status`` number (``"2"``: ``INUSE``),
    or None when it is not one."""
    return _BY_NUMBER.get(status or "")


def device_of(dial_string: str) -> str:
    """The device name of a dial string: ``PJSIP/7001`` from ``PJSIP/7001/sip:...``,
    ``Local/7001@agents`` from ``Local/7001@agents/n``."""
    parts = dial_string.split("/")
    return "/".join(parts[:2]) if len(parts) >= 2 else dial_string


class Presence:
    """Last known device state per device, with the time it was seen."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[str, float]] = {}

    def update(self, device: str, state: str) -> None:
        """Record ``state`` (an Asterisk device state name) for ``device``."""
        self._states[device_of(device)] = (state.upper(), time.time())

    def state(self, dial_string: str) -> str | None:
        """Last state seen for the device of ``dial_string``, or None."""
        entry = self._states.get(device_of(dial_string))
        return entry[0] if entry else None

    def available(self, dial_string: str) -> bool:
        """False only when the device is known to be unable to take a call."""
        state = self.state(dial_string)
        return state is None or state not in UNAVAILABLE

    def snapshot(self) -> dict[str, str]:
        """Device → state, for the admin API."""
        return {device: state for device, (state, _) in self._states.items()}
