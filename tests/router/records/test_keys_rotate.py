"""``callroute keys rotate`` on an outbox holding values it cannot re-encrypt (their key
dropped from the ring, or corrupt), against a real Redis and spool: it re-encrypts the
rest, names what it could not by id (never its plaintext) and exits 3."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from router.crypto import KeyRing, key_id_of
from router.records import keys_cli
from router.records.spool import SUFFIX
from router.settings import load_settings
from tests.router.records.outbox_crm import (  # noqa: F401  (fixtures)
    FakeCrm,
    Harness,
    call_record,
    crm_fixture,
    harness_fixture,
)

K0 = "k0:" + base64.b64encode(b"0" * 32).decode()  # dropped from the ring before rotating
K1 = "k1:" + base64.b64encode(b"1" * 32).decode()
K2 = "k2:" + base64.b64encode(b"2" * 32).decode()
#: what the records hold that no output may show
PLAINTEXT = ("13800138000", "Li Lei", "monitor")


def config_file(tmp_path: Path, redis_url: str, keys: str) -> Path:
    """A config file on the test Redis with the harness's prefix and spool, and ``keys``."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"redis:\n  url: {redis_url}\n  prefix: 't:'\noutbox:\n  spool_dir: spool\n"
        f"crm:\n  base_url: http://127.0.0.1:1\nencryption:\n  keys: '{keys}'\n"
    )
    return path


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Parse like ``callroute`` does and run the keys handler; (exit status, stdout)."""
    parser = argparse.ArgumentParser(prog="callroute")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code: int = args.security_handler(load_settings(args.config), args)
    return code, out.getvalue()


def record(n: int) -> dict[str, Any]:
    return call_record(n, caller_name="Li Lei")


def sealed(ring: KeyRing, n: int) -> str:
    return ring.seal(json.dumps(record(n)), f"call-{n}")


async def fill(h: Harness) -> dict[str, str]:
    """Under k1 (kept): two stream entries, a retry, a dead letter, a spool file. Under
    k0 (dropped): a stream entry, a dead letter, a retry and a spool file. Corrupt: a
    stream entry (not base64), a retry member that is no JSON, a spool file that is no
    text. Returns the ids of those that cannot be re-encrypted, by a name."""
    k0, k1 = KeyRing.parse(K0), KeyRing.parse(K1)
    h.outbox.crypto = h.spool.crypto = k1
    for n in (1, 2):
        await h.outbox.enqueue(record(n))
    bad: dict[str, str] = {}
    fields = {"key": "call-3", "record": sealed(k0, 3), "attempt": "0", "enq": "1",
              "error": ""}
    bad["stream-k0"] = await h.redis.xadd(h.keys.outbox_stream, fields)
    fields = {**fields, "key": "call-4", "record": "enc1:k1:%%%not-base64%%%"}
    bad["stream-corrupt"] = await h.redis.xadd(h.keys.outbox_stream, fields)
    dead = {"attempt": "3", "enq": "1", "error": "x", "reason": "rejected"}
    await h.redis.xadd(h.keys.outbox_dead, {"key": "call-5", "record": sealed(k1, 5), **dead})
    bad["dead-k0"] = await h.redis.xadd(h.keys.outbox_dead,
                                        {"key": "call-6", "record": sealed(k0, 6), **dead})
    due = time.time() * 1000 + 3_600_000
    for n, ring in ((7, k1), (8, k0)):
        member = json.dumps({"key": f"call-{n}", "record": sealed(ring, n), "attempt": "1",
                             "enq": "1", "error": ""})
        await h.redis.zadd(h.keys.outbox_retry, {member: due})
    await h.redis.zadd(h.keys.outbox_retry, {"{not json": due})
    h.spool.put("call-10", record(10))
    h.spool.crypto = k0
    bad["spool-k0"] = h.spool.put("call-11", record(11)).name
    junk = h.spool.dir / f"{time.time_ns():020d}-99999999-junk{SUFFIX}"
    junk.write_bytes(b"\xff\xfe" + json.dumps(record(12)).encode())
    bad["spool-corrupt"] = junk.name
    return bad


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
async def test_rotate_carries_on_past_what_it_cannot_reencrypt_and_exits_3(
    h: Harness, redis_url: str, tmp_path: Path, as_json: bool
) -> None:
    """With k0 dropped (ring k2, k1), rotate re-encrypts every value under k1 to k2 in
    the stream, the dead letters, the retry set and the spool; the values under k0 and
    the corrupt ones are left as they are, counted, and listed by stream id, record key
    or file name with why, without any of their plaintext; the exit status is 3."""
    bad = await fill(h)
    argv = ["keys", "rotate", "--config", str(config_file(tmp_path, redis_url, f"{K2},{K1}"))]
    code, out = await asyncio.to_thread(run_cli, argv + (["--json"] if as_json else []))
    assert code == 3, out
    for text in PLAINTEXT:
        assert text not in out
    if as_json:
        data = json.loads(out)
        failed = data.pop("not_reencrypted")
        assert data == {"stream": 2, "dead": 1, "retry": 1, "spool": 1}
        where = {(f["place"], f["id"]): f for f in failed}
        assert len(failed) == 7
        assert set(where) == {(name.split("-")[0], eid) for name, eid in bad.items()} | {
            ("retry", "call-8"), ("retry", "(unreadable member)")}
        assert where["stream", bad["stream-k0"]] == {
            "place": "stream", "id": bad["stream-k0"], "key": "call-3",
            "error": "value encrypted with key 'k0', which is not configured"}
        assert where["dead", bad["dead-k0"]]["key"] == "call-6"
        assert where["stream", bad["stream-corrupt"]]["error"] == \
            "an encrypted value is not base64"
        assert where["spool", bad["spool-corrupt"]]["error"] == "not UTF-8 text"
    else:
        assert "re-encrypted: dead 1, retry 1, spool 1, stream 2" in out
        assert "could not re-encrypt 7 value(s)" in out
        for value in (*bad.values(), "call-8"):
            assert value in out
    stream = {eid: f["record"] for eid, f in await h.redis.xrange(h.keys.outbox_stream)}
    assert key_id_of(stream[bad["stream-k0"]]) == "k0"
    assert stream[bad["stream-corrupt"]] == "enc1:k1:%%%not-base64%%%"
    assert sorted(key_id_of(v) or "-" for v in stream.values()) == ["k0", "k1", "k2", "k2"]
    dead = [key_id_of(f["record"]) for _, f in await h.redis.xrange(h.keys.outbox_dead)]
    assert sorted(d or "-" for d in dead) == ["k0", "k2"]
    members = await h.redis.zrange(h.keys.outbox_retry, 0, -1)
    assert "{not json" in members
    keyed = {json.loads(m)["key"]: key_id_of(json.loads(m)["record"])
             for m in members if m != "{not json"}
    assert keyed == {"call-7": "k2", "call-8": "k0"}
    spooled = {p.name: p.read_bytes() for p in h.spool.files()}
    assert key_id_of(spooled[bad["spool-k0"]]) == "k0"
    assert spooled[bad["spool-corrupt"]].startswith(b"\xff\xfe")
    assert sorted(key_id_of(v) or "-" for v in spooled.values()) == ["-", "k0", "k2"]


async def test_status_counts_an_unreadable_retry_member_and_rotate_help_names_exit_3(
    h: Harness, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys status` counts a retry member that is no JSON as unreadable instead of
    stopping on it, and `keys rotate --help` documents its exit statuses, 3 among them."""
    await h.redis.zadd(h.keys.outbox_retry, {"{not json": 1})
    cfg = config_file(tmp_path, redis_url, f"{K2},{K1}")
    code, out = await asyncio.to_thread(run_cli, ["keys", "status", "--config", str(cfg),
                                                  "--json"])
    assert code == 0
    assert json.loads(out)["retry"] == {keys_cli.UNREADABLE: 1}
    with pytest.raises(SystemExit):
        run_cli(["keys", "rotate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "3: some values could not be re-encrypted" in help_text
