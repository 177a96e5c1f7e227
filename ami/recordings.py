"""Links to call recordings that lead to the file: signed URLs served by the admin API.

A call record names the file MixMonitor wrote (``recording``). When ``recordings.dir`` is
set, callroute adds ``recording_url``: ``<recordings.url>/<file name>?sig=<hmac>``, and the
admin API answers ``GET /recordings/<file name>?sig=`` with the file
(:meth:`RecordingLinks.handle`, mounted by :func:`router.admin.add_recordings`). The signature
(HMAC-SHA256 of the file name with ``recordings.key``) is what makes the link work
without the admin token: a CRM user can follow it, nobody can guess another one.

Only a plain file name of an audio file directly inside ``recordings.dir`` is served
(no ``/``, no ``..``, no hidden file, no symbolic link leading elsewhere); anything else
is 404, a wrong signature 403.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

#: A file name that may be served: letters, digits, dot, dash, underscore; audio suffix.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}\.(wav|WAV|gsm|mp3|ogg|sln|g722)$")
CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg"}


class RecordingLinks:
    """Signs links to the recordings in ``directory`` and serves the files they name."""

    def __init__(self, directory: Path, base_url: str, key: str) -> None:
        if not key:
            raise ValueError("recordings need a signing key")
        self.directory = directory
        self.base_url = base_url.rstrip("/")
        self._key = key.encode()

    def signature(self, name: str) -> str:
        """The link signature of file ``name``."""
        return hmac.new(self._key, name.encode(), hashlib.sha256).hexdigest()[:32]

    def link(self, path: str | None) -> str | None:
        """The signed link to the recording at ``path`` (as Asterisk named it), or None
        when its file name is not one that is served."""
        name = Path(path or "").name
        if not SAFE_NAME.match(name):
            return None
        return f"{self.base_url}/{quote(name)}?sig={self.signature(name)}"

    def resolve(self, name: str, sig: str) -> Path | bool | None:
        """The file for a request: its path, None (404: not a servable file) or False (403:
        the signature is wrong)."""
        if not SAFE_NAME.match(name):
            return None
        if not hmac.compare_digest(sig.encode(), self.signature(name).encode()):
            return False
        base = self.directory.resolve()
        path = (base / name).resolve()
        if path.parent != base or not path.is_file():
            return None
        return path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /recordings/{name}?sig=``."""
        found = self.resolve(request.match_info["name"], request.query.get("sig", ""))
        if found is False:
            return web.json_response({"error": "bad signature"}, status=403)
        if not isinstance(found, Path):
            return web.json_response({"error": "no such recording"}, status=404)
        kind = CONTENT_TYPES.get(found.suffix.lstrip(".").lower(), "application/octet-stream")
        return web.FileResponse(found, headers={"Content-Type": kind,
                                                "Cache-Control": "private, max-age=3600"})
