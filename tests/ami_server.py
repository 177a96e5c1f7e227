"""A small scripted AMI server for tests of the commands that ask Asterisk questions.

It speaks AMI as Asterisk 22 does on the wire (banner, ``Key: Value`` blocks ended by a
blank line, CRLF), checks ``Login``, and answers ``QueueStatus`` (queues and members
from :attr:`ScriptedAmi.queues`), ``Getvar`` of ``DEVICE_STATE(<device>)`` (from
:attr:`ScriptedAmi.devices`, ``INVALID`` for any other device, as Asterisk answers),
``Ping`` and ``Logoff``; anything else gets ``Response: Error``. Each connection runs in
a thread of its own (socketserver), so synchronous tests can run the CLI against it.
The recorded-bytes peer (``ami.peer.AmiPeer``) stays the ground truth for the protocol;
this one answers the questions the recordings do not contain.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
#: Asterisk's device state numbers, as QueueMember's Status carries them.
STATUS = {"UNKNOWN": 0, "NOT_INUSE": 1, "INUSE": 2, "BUSY": 3, "INVALID": 4,
          "UNAVAILABLE": 5, "RINGING": 6, "RINGINUSE": 7, "ONHOLD": 8}


def block(*pairs: tuple[str, str]) -> bytes:
    """One AMI message."""
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in pairs) + b"\r\n"


@dataclass
class ScriptedAmi:
    """What the server knows: queue -> member interfaces; device -> state; its user."""

    queues: dict[str, list[str]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    username: str = "callroute"
    secret: str = "s3cret"
    #: write privileges: actions outside this set are refused as Asterisk refuses them
    allowed: set[str] = field(default_factory=lambda: {"login", "logoff", "ping",
                                                        "queuestatus", "getvar"})
    actions: list[dict[str, str]] = field(default_factory=list)

    def answer(self, action: dict[str, str]) -> bytes:
        """The bytes Asterisk would send back to ``action``."""
        name = action.get("Action", "").lower()
        aid = ("ActionID", action.get("ActionID", ""))
        if name not in self.allowed:
            return block(("Response", "Error"), aid, ("Message", "Permission denied"))
        if name == "ping":
            return block(("Response", "Success"), aid, ("Ping", "Pong"))
        if name == "logoff":
            return block(("Response", "Goodbye"), aid, ("Message", "Thanks for all the fish."))
        if name == "getvar":
            variable = action.get("Variable", "")
            device = variable.removeprefix("DEVICE_STATE(").removesuffix(")")
            return block(("Response", "Success"), aid, ("Variable", variable),
                         ("Value", self.devices.get(device, "INVALID")))
        if name == "queuestatus":
            out = [block(("Response", "Success"), aid, ("EventList", "start"),
                         ("Message", "Queue status will follow"))]
            items = 0
            for queue, members in self.queues.items():
                out.append(block(("Event", "QueueParams"), ("Queue", queue), ("Max", "0"),
                                 ("Strategy", "rrmemory"), ("Calls", "0"), aid))
                for member in members:
                    state = self.devices.get(member.removesuffix("/n"), "INVALID")
                    out.append(block(("Event", "QueueMember"), ("Queue", queue),
                                     ("Name", member), ("Location", member),
                                     ("StateInterface", member), ("Membership", "static"),
                                     ("Status", str(STATUS[state])), ("Paused", "0"), aid))
                    items += 1
                items += 1
            out.append(block(("Event", "QueueStatusComplete"), aid, ("EventList", "Complete"),
                             ("ListItems", str(items))))
            return b"".join(out)
        return block(("Response", "Error"), aid, ("Message", "Invalid/unknown command"))


def _parse(raw: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in raw.decode().split("\r\n"):
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


@contextmanager
def scripted_ami(script: ScriptedAmi) -> Iterator[int]:
    """Serve ``script`` on 127.0.0.1 (a free port, yielded) until the block ends."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            sock.sendall(BANNER)
            buffer, logged_in = b"", False
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    raw, buffer = buffer.split(b"\r\n\r\n", 1)
                    action = _parse(raw)
                    script.actions.append(action)
                    aid = ("ActionID", action.get("ActionID", ""))
                    if not logged_in:
                        if (action.get("Action", "").lower() == "login"
                                and action.get("Username") == script.username
                                and action.get("Secret") == script.secret):
                            logged_in = True
                            sock.sendall(block(("Response", "Success"), aid,
                                               ("Message", "Authentication accepted")))
                            continue
                        sock.sendall(block(("Response", "Error"), aid,
                                           ("Message", "Authentication failed")))
                        return
                    sock.sendall(script.answer(action))
                    if action.get("Action", "").lower() == "logoff":
                        return

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield int(server.server_address[1])
        finally:
            server.shutdown()
            thread.join(5)
