"""A real Asterisk 22 for tests: the shared kit, callroute's own asterisk-conf/ installed the
way asterisk-conf/README.md tells a user to, and a test AMI connection that places calls.

The kit (``../shared/asterisk`` beside the repository, or ``$CALLROUTE_ASTERISK_KIT``)
starts an Asterisk with its own HOME and CONFDIR in about half a second. The CONFDIR the
tests build holds:

* callroute's fragments, copied byte for byte from ``asterisk-conf/``
  (``extensions_callroute.conf``, ``manager_callroute.conf``, ``queues_callroute.conf``);
* "the user's own" files, which only hook them in as the README says (``#include`` lines,
  ``[globals]``, ``enabled = yes`` in cdr_manager.conf) plus test glue: a trunk context
  that sends every DID to ``[callroute-inbound]``, agents as Local channels that answer,
  are busy or never answer, a caller side that speaks (a tone) and hangs up, a mailbox,
  and a test AMI user allowed to originate, beside the product's least-privilege
  ``callroute`` user.

Nothing here knows how callroute builds a record: :mod:`tests.asterisk.truth` reads what
Asterisk did from Asterisk's own output (Cdr events, queue_log, full.log, files).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ami.protocol import AmiParser, Message, build_action

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "asterisk-conf"
KIT_ENV = "CALLROUTE_ASTERISK_KIT"
REQUIRE_ENV = "CALLROUTE_REQUIRE_ASTERISK"
#: The fragments a user copies next to their own files (asterisk-conf/README.md).
FRAGMENTS = ("extensions_callroute.conf", "manager_callroute.conf", "queues_callroute.conf")

#: The test AMI user (originate rights) and the secret given to the product's user.
TEST_USER, TEST_SECRET = "tester", "tester-secret"
CALLROUTE_SECRET = "callroute-test-secret-0123456789"


def kit_dir() -> Path:
    """Where the Asterisk kit is: ``$CALLROUTE_ASTERISK_KIT`` or ``<repo>/../shared/asterisk``."""
    return Path(os.environ.get(KIT_ENV) or ROOT.parent / "shared" / "asterisk")


def kit_problem() -> str | None:
    """None when the kit can be used, else one line saying why not."""
    script = kit_dir() / "asterisk"
    if not script.is_file() or not os.access(script, os.X_OK):
        return (f"real-Asterisk tests skipped: no Asterisk kit at {kit_dir()} "
                f"(set {KIT_ENV}; {REQUIRE_ENV}=1 makes this an error)")
    return None


def kit_required() -> bool:
    """True when a missing kit must fail the run (CI sets CALLROUTE_REQUIRE_ASTERISK=1)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


# --- the user's files ---------------------------------------------------------------------

#: Agents (test glue). 7009/7019 are busy, 7008/7018 ring and never answer, any other 7XXX
#: rings ${RING_S} seconds (default: none; the caller may set __RING_S), answers, talks
#: ${TALK_S} seconds (default 2; the caller may set __TALK_S) and hangs up.
AGENTS = """\
[agents]
exten => 7009,1,Busy(2)
exten => 7019,1,Busy(2)
exten => 7008,1,Wait(120)
exten => 7018,1,Wait(120)
exten => _7XXX,1,ExecIf($["${RING_S}" != ""]?Wait(${RING_S}))
 same => n,Answer()
 same => n,Wait(${IF($["${TALK_S}" = ""]?2:${TALK_S})})
 same => n,Hangup()
"""

#: The caller's side (test glue): the ;1 half of the originated Local channel runs this
#: once the call is answered: it "speaks" (a tone, so VoiceMail records a message) for
#: ${HOLD_S} seconds (default 10), then hangs up.
CALLER = """\
[caller]
exten => talk,1,PlayTones(440)
 same => n,Wait(${IF($["${HOLD_S}" = ""]?10:${HOLD_S})})
 same => n,Hangup()
"""

#: The trunk (test glue): every DID goes to callroute, as asterisk-conf/README.md shows.
#: 4008005000 is a line whose callers wait at most 4 s in a queue (a channel variable
#: overrides the CALLROUTE_QUEUE_WAIT_S global for that call).
TRUNK = """\
[from-trunk]
exten => 4008005000,1,Set(CALLROUTE_QUEUE_WAIT_S=4)
 same => n,Goto(callroute-inbound,${EXTEN},1)
exten => 4008006000,1,Goto(own-dialplan,busy,1)
exten => 4008007000,1,Goto(own-dialplan,unavailable,1)
exten => _X.,1,Goto(callroute-inbound,${EXTEN},1)
"""

_ROUTE_LINE = (
    "NoOp(callroute: call ${CHANNEL(linkedid)} AGISTATUS=${AGISTATUS} action=${ROUTE_ACTION}"
    " rule=${ROUTE_RULE} reason=${ROUTE_REASON} target=${ROUTE_TARGET} queue=${ROUTE_QUEUE})")
#: A user's own dialplan around callroute's AGI (test glue): no queue and no fallback, so
#: a call ends with its Dial's status: ``busy`` rings a busy agent, ``unavailable`` a
#: device that cannot be reached (a Local channel to a context that does not exist). Each
#: logs the route as callroute's own context does, for the tests' reading of full.log.
OWN = """\
[own-dialplan]
exten => busy,1,AGI(agi://127.0.0.1:${CALLROUTE_PORT}/route?did=4008006000)
 same => n,{route}
 same => n,Dial(Local/7019@agents,5)
 same => n,Hangup()
exten => unavailable,1,AGI(agi://127.0.0.1:${CALLROUTE_PORT}/route?did=4008007000)
 same => n,{route}
 same => n,Dial(Local/7404@no-such-context,5)
 same => n,Hangup()
""".replace("{route}", _ROUTE_LINE)


def user_files(ami_port: int, agi_port: int, globals_: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """The user's own Asterisk files, hooking callroute in as asterisk-conf/README.md says."""
    glob = {"CALLROUTE_HOST": "127.0.0.1", "CALLROUTE_PORT": str(agi_port),
            "CALLROUTE_DEFAULT_QUEUE": "support", "CALLROUTE_QUEUE_WAIT_S": "30",
            **(globals_ or {})}
    globals_text = "".join(f"{k}={v}\n" for k, v in glob.items() if v != "")
    return {
        "extensions.conf": (
            "[general]\nstatic=yes\nwriteprotect=yes\n\n[globals]\n" + globals_text +
            "\n#include extensions_callroute.conf\n\n" + TRUNK + "\n" + OWN + "\n" + AGENTS
            + "\n" + CALLER
        ),
        "manager.conf": (
            f"[general]\nenabled = yes\nport = {ami_port}\nbindaddr = 127.0.0.1\n\n"
            f"[{TEST_USER}]\nsecret = {TEST_SECRET}\nread = all\nwrite = all\n\n"
            "#include manager_callroute.conf\n\n"
            f"[callroute](+)\nsecret = {CALLROUTE_SECRET}\n"
        ),
        "queues.conf": "[general]\npersistentmembers = no\n\n#include queues_callroute.conf\n",
        "cdr_manager.conf": "[general]\nenabled = yes\n\n[mappings]\n",
        "voicemail.conf": "[general]\nformat = wav\n\n[default]\n8000 => 0000,After hours\n",
    }


def install(confdir: Path, ami_port: int, agi_port: int,
            globals_: Mapping[str, str] | None = None) -> None:
    """Fill ``confdir``: the fragments copied from asterisk-conf/, the user's own files."""
    confdir.mkdir(parents=True, exist_ok=True)
    for name in FRAGMENTS:
        shutil.copyfile(CONF / name, confdir / name)
    for name, text in user_files(ami_port, agi_port, globals_).items():
        (confdir / name).write_text(text)


# --- the Asterisk process -----------------------------------------------------------------


def zone_wrapper(tz: str) -> list[str]:
    """A command prefix that runs a program with ``/etc/localtime`` showing zone ``tz``
    (a private mount namespace: needs unshare and mount, i.e. root)."""
    zonefile = Path("/usr/share/zoneinfo") / tz
    script = 'mount --bind "$ZONEFILE" /etc/localtime && exec "$@"'
    return ["env", f"ZONEFILE={zonefile}", "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh"]


def zone_problem(tz: str) -> str | None:
    """None when Asterisk can be given clock zone ``tz`` here, else why not."""
    if not (Path("/usr/share/zoneinfo") / tz).is_file():
        return f"no zone file for {tz}"
    if shutil.which("unshare") is None:
        return "no unshare(1) to give Asterisk a zone of its own"
    probe = subprocess.run([*zone_wrapper(tz), "date", "+%z"], capture_output=True,
                           text=True, timeout=10, check=False)
    if probe.returncode != 0:
        return f"cannot give Asterisk its own /etc/localtime: {probe.stderr.strip()[:200]}"
    return None


class Asterisk:
    """One Asterisk started by the kit in ``home``; :meth:`stop` is safe to call twice."""

    def __init__(self, home: Path, ami_port: int, agi_port: int, *, tz: str | None = None,
                 globals_: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.ami_port = ami_port
        self.agi_port = agi_port
        self.tz = tz
        self.confdir = home / "conf"
        self.root = home / "ast"
        self.script = kit_dir() / "asterisk"
        install(self.confdir, ami_port, agi_port, globals_)

    @property
    def full_log(self) -> Path:
        return self.root / "var" / "log" / "asterisk" / "full.log"

    @property
    def queue_log(self) -> Path:
        return self.root / "var" / "log" / "asterisk" / "queue_log"

    @property
    def monitor(self) -> Path:
        return self.root / "var" / "spool" / "asterisk" / "monitor"

    @property
    def voicemail(self) -> Path:
        return self.root / "var" / "spool" / "asterisk" / "voicemail"

    def _run(self, *args: str, timeout: float = 60.0, wrap: list[str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        if self.tz:
            env["TZ"] = self.tz
        return subprocess.run([*(wrap or []), str(self.script), *args], capture_output=True,
                              text=True, timeout=timeout, env=env, check=False)

    def start(self) -> None:
        """Start (the kit waits until fully booted); raise with its output if it fails.

        Asterisk reads its local zone from /etc/localtime only (main/stdtime/localtime.c
        ignores TZ): for ``tz`` it is started in a mount namespace of its own where that
        zone's file is bound over /etc/localtime (and with TZ set, for libc).
        """
        wrap = zone_wrapper(self.tz) if self.tz else None
        done = self._run("start", str(self.root), str(self.confdir), wrap=wrap)
        if done.returncode != 0:
            raise RuntimeError(f"asterisk did not start: {done.stdout}{done.stderr}")

    def stop(self) -> None:
        """Stop it (by its pid file)."""
        self._run("stop", str(self.root), timeout=30)

    def rx(self, command: str) -> str:
        """The output of one CLI command."""
        done = self._run("rx", str(self.root), command, timeout=20)
        return done.stdout

    def log_lines(self, needle: str) -> list[str]:
        """Lines of full.log containing ``needle``."""
        if not self.full_log.exists():
            return []
        with self.full_log.open(encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in f if needle in line]

    def queue_log_rows(self, callids: Iterable[str]) -> list[list[str]]:
        """queue_log rows (split on |) whose callid is one of ``callids``."""
        wanted = set(callids)
        if not self.queue_log.exists():
            return []
        rows = [line.rstrip("\n").split("|") for line in self.queue_log.read_text().splitlines()]
        return [r for r in rows if len(r) > 4 and r[1] in wanted]


# --- the test's own AMI connection --------------------------------------------------------


@dataclass
class CallView:
    """Every event the test user saw for one call (one Linkedid)."""

    linkedid: str
    tag: str
    events: list[tuple[float, Message]] = field(default_factory=list)
    cdrs: list[dict[str, str]] = field(default_factory=list)
    uids: dict[str, str] = field(default_factory=dict)  # uniqueid -> channel name
    live: set[str] = field(default_factory=set)
    caller_hangup_at: float | None = None
    ended_at: float | None = None
    last_cdr_at: float | None = None

    def vars(self, name: str) -> list[str]:
        """Values the channels of the call set for variable ``name`` (VarSet), in order."""
        return [m.get("Value") or "" for _, m in self.events
                if m.event == "VarSet" and (m.get("Variable") or "").lstrip("_") == name]

    def named(self, event: str) -> list[Message]:
        """Events of this call with that name, in order."""
        return [m for _, m in self.events if m.event == event]

    def dump(self) -> str:
        """Every event of the call as AMI text (for a failing test's report)."""
        blocks = []
        for at, msg in self.events:
            lines = [f"{k}: {v}" for k, v in msg.headers.items()]
            blocks.append(f"# {at:.3f}\n" + "\n".join(lines))
        blocks += ["\n".join(f"{k}: {v}" for k, v in cdr.items()) for cdr in self.cdrs]
        return "\n\n".join(blocks) + "\n"

    @property
    def inbound_channel(self) -> str | None:
        """The ;2 half of the originated Local channel (the one that runs the dialplan)."""
        return next((name for uid, name in self.uids.items()
                     if name.endswith(";2") and "@from-trunk-" in name), None)


class Observer:
    """The test's AMI connection (user ``tester``, all events): places calls by
    ``Originate`` and keeps, per call, every event and Cdr Asterisk sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.events: list[tuple[float, Message]] = []
        self.calls: dict[str, CallView] = {}
        self._by_tag: dict[str, CallView] = {}
        self._uid_lid: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._tags = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._lists: dict[str, list[Message]] = {}
        self._done_lists: dict[str, list[Message]] = {}
        self._early: dict[str, list[tuple[float, Message]]] = {}
        self._changed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def connect(self, user: str = TEST_USER, secret: str = TEST_SECRET) -> Message:
        """Connect and log in; returns the Login response."""
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._reader_task = asyncio.create_task(self._read(reader))
        return await self.action("Login", Username=user, Secret=secret)

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.action("Logoff"), 1.0)
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)

    async def action(self, name: str, **fields: str | list[str]) -> Message:
        """Send an action and return its response (event lists: see :meth:`listing`)."""
        assert self._writer is not None
        aid = f"t{next(self._ids)}"
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[aid] = future
        self._writer.write(build_action(name, aid, fields))
        return await asyncio.wait_for(future, 10)

    async def listing(self, name: str, **fields: str) -> tuple[Message, list[Message]]:
        """An action answered by an event list: the response and the list's events."""
        aid = f"t{next(self._ids)}"
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[aid] = future
        self._lists[aid] = []
        assert self._writer is not None
        self._writer.write(build_action(name, aid, fields))
        response = await asyncio.wait_for(future, 10)
        if (response.get("EventList") or "").lower() == "start":
            await self.wait(lambda: self._lists.get(aid) is None, 10)
        return response, self._done_lists.pop(aid, [])

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = AmiParser(max_message_bytes=1 << 20)
        while data := await reader.read(65536):
            now = time.time()
            for msg in parser.feed(data):
                self._dispatch(now, msg)
            self._changed.set()

    def _dispatch(self, now: float, msg: Message) -> None:
        aid = msg.action_id
        if msg.event is None:
            future = self._pending.pop(aid or "", None)
            if future is not None and not future.done():
                future.set_result(msg)
            return
        if aid is not None and aid in self._lists:
            if msg.is_list_end:
                self._done_lists[aid] = self._lists.pop(aid)
            else:
                self._lists[aid].append(msg)
            return
        self.events.append((now, msg))
        self._track(now, msg)

    def _track(self, now: float, msg: Message) -> None:
        h = msg.headers
        if msg.event == "Cdr":
            lid = self._uid_lid.get(h.get("UniqueID", ""))
            owner = self.calls.get(lid) if lid is not None else None
            if owner is not None:
                owner.cdrs.append(dict(h))
                owner.last_cdr_at = now
            return
        uid, lid = h.get("Uniqueid"), h.get("Linkedid")
        if not uid or not lid:
            return
        if msg.event == "VarSet" and h.get("Variable") == "TEST_CALL" and uid == lid:
            tagged = self._by_tag.get(h.get("Value", ""))
            if tagged is not None and tagged.linkedid == "":
                tagged.linkedid = lid
                self.calls[lid] = tagged
        call = self.calls.get(lid)
        if call is None:
            # events before the TEST_CALL VarSet (Newchannel): kept until the tag shows up
            self._early.setdefault(lid, []).append((now, msg))
            return
        for t, early in self._early.pop(lid, []):
            self._add(call, t, early)
        self._add(call, now, msg)

    def _add(self, call: CallView, now: float, msg: Message) -> None:
        h = msg.headers
        uid = h.get("Uniqueid", "")
        call.events.append((now, msg))
        if uid not in call.uids:
            call.uids[uid] = h.get("Channel", "")
            call.live.add(uid)
            self._uid_lid[uid] = call.linkedid
        if msg.event == "Rename":
            call.uids[uid] = h.get("Newname", call.uids[uid])
        if msg.event == "Hangup":
            call.live.discard(uid)
            if uid == call.linkedid:
                call.caller_hangup_at = now
            if not call.live:
                call.ended_at = now

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds (checked after every batch of events)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("condition not reached in time")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))

    async def originate(self, did: str, callerid: str, *, hold_s: float = 10,
                        patience_s: float = 30, talk_s: float | None = None,
                        variables: Mapping[str, str] | None = None) -> CallView:
        """Place a call to ``did`` from ``callerid`` (``"Name" <number>``) and return its
        view once Asterisk has created it. The caller waits ``patience_s`` for an answer,
        then talks ``hold_s`` and hangs up; agents talk ``talk_s`` (default 2)."""
        tag = f"c{next(self._tags)}-{os.getpid()}"
        view = CallView(linkedid="", tag=tag)
        self._by_tag[tag] = view
        var = [f"TEST_CALL={tag}", f"HOLD_S={hold_s:g}"]
        if talk_s is not None:
            var.append(f"__TALK_S={talk_s:g}")
        var += [f"{k}={v}" for k, v in (variables or {}).items()]
        fields: dict[str, str | list[str]] = {
            "Channel": f"Local/{did}@from-trunk", "Context": "caller", "Exten": "talk",
            "Priority": "1", "Timeout": str(int(patience_s * 1000)), "Async": "true",
            "Variable": var,
        }
        if callerid:
            fields["CallerID"] = callerid
        response = await self.action("Originate", **fields)
        assert (response.response or "").lower() == "success", response.headers
        await self.wait(lambda: view.linkedid != "", 10)
        return view

    async def wait_ended(self, views: Iterable[CallView], timeout: float = 60) -> None:  # noqa: ASYNC109
        """Wait until every channel of these calls has hung up and their Cdrs are in."""
        calls = list(views)

        def done() -> bool:
            return all(c.ended_at is not None and c.cdrs and
                       {cdr.get("UniqueID") for cdr in c.cdrs} >= {c.linkedid} for c in calls)

        await self.wait(done, timeout)


def strategies(show: str) -> dict[str, str]:
    """Queue name -> running strategy, from the output of ``queue show``."""
    return dict(re.findall(r"^(\S+) has \d+ calls .*? in '([a-z]+)' strategy", show, re.M))
