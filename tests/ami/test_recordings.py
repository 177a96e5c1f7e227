"""Signed links to recordings, and the admin route that serves them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ami.recordings import RecordingLinks


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    monitor = tmp_path / "monitor"
    monitor.mkdir()
    (monitor / "1796122613.3.wav").write_bytes(b"RIFF" + b"\0" * 60)
    (tmp_path / "secret.wav").write_bytes(b"not yours")
    (monitor / "escape.wav").symlink_to(tmp_path / "secret.wav")
    return monitor


@pytest.fixture
async def client(folder: Path) -> AsyncIterator[tuple[TestClient[web.Request, web.Application],
                                                      RecordingLinks]]:
    links = RecordingLinks(folder, "http://pbx.example.com:8074/recordings/", "k3y")
    app = web.Application()
    app.router.add_get("/recordings/{name}", links.handle)
    async with TestClient(TestServer(app)) as http:
        yield http, links


def test_link_is_signed_and_only_for_plain_audio_names(folder: Path) -> None:
    """The link carries the file name and its HMAC; a path keeps only its file name;
    names that are not plain audio file names get no link; a key is required."""
    links = RecordingLinks(folder, "http://pbx:8074/recordings/", "k3y")
    url = links.link("/var/spool/asterisk/monitor/1796122613.3.wav")
    assert url == ("http://pbx:8074/recordings/1796122613.3.wav?sig="
                   + links.signature("1796122613.3.wav"))
    assert len(links.signature("a.wav")) == 32
    assert links.signature("a.wav") != RecordingLinks(folder, "x", "other").signature("a.wav")
    for bad in (None, "", "/x/.hidden.wav", "/x/a b.wav", "/x/notes.txt", "/x/..wav"):
        assert links.link(bad) is None, bad
    with pytest.raises(ValueError, match="key"):
        RecordingLinks(folder, "x", "")


async def test_serves_the_file_by_its_signed_link(
        client: tuple[TestClient[web.Request, web.Application], RecordingLinks],
        folder: Path) -> None:
    """The signed link downloads the file; a wrong or missing signature is 403; a name
    that is not in the folder, escapes it (../, a symbolic link) or is not audio is 404."""
    http, links = client
    sig = links.signature("1796122613.3.wav")
    resp = await http.get(f"/recordings/1796122613.3.wav?sig={sig}")
    assert resp.status == 200
    assert await resp.read() == (folder / "1796122613.3.wav").read_bytes()
    assert resp.headers["Content-Type"] == "audio/wav"
    assert (await http.get("/recordings/1796122613.3.wav?sig=" + "0" * 32)).status == 403
    assert (await http.get("/recordings/1796122613.3.wav")).status == 403
    for name in ("nothere.wav", "escape.wav", "..%2Fsecret.wav", "x.txt"):
        resp = await http.get(f"/recordings/{name}?sig={links.signature(name)}")
        assert resp.status == 404, name
