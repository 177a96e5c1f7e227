"""Test helpers for the CRM tests: the sample CRM and scripted servers on loopback.

Everything listens on 127.0.0.1 with port 0 and is stopped by the context managers.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from router.crm.config import CrmSettings
from router.crm.rest import RestConnector
from router.samplecrm import Faults, SampleCrm, make_app, start_sample_crm, state_of
from tests.redis_server import free_port

#: A self-signed certificate for 127.0.0.1 / localhost (valid for 100 years), and its key.
#: Test-only material: generated with ``openssl req -x509 -newkey rsa:2048 -nodes``.
TEST_CERT = """\
-----BEGIN CERTIFICATE-----
MIIDJzCCAg+gAwIBAgIUUz08Z1Yvjs9KmQoah0p+Pf4pHt4wDQYJKoZIhvcNAQEL
BQAwFDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTEyMjIyMTMzOVoYDzIxMjYx
MDI5MjIxMzM5WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQDHcihj0eSiFd7EKu+w4IOiL6DJgyLBIjuEErKX4ek9
PPr1G9whtLssBCGLsIYRQk0d8GomF8GA37y0fBFqPt9Om9TrNcoFFDwxIYttorpG
1GS9LWXn0GzcBjcpU6uFpx+k5eCF92DuhrAxuKL1y2MNdbB3izBer8a9wZo0Jobw
ejVjnHS/SBU9EA/aUZ81m+ubtMGSXZ+RY0G7D5BorhB4VPaYpt3yr/hDZRUK9QcV
fOto3EZAt5QS8qmW7+9wI8RG2bad+qTQouLeerty0YpT9WNS6L3BtIAJUsSO2Gk6
0QkmQV7HFffpD3CvEPMXIOgyyWRZ+mZYYDIAzNT8p4eJAgMBAAGjbzBtMB0GA1Ud
DgQWBBTrkGMQMsN2vqslhxvJnfuAvQCBkTAfBgNVHSMEGDAWgBTrkGMQMsN2vqsl
hxvJnfuAvQCBkTAaBgNVHREEEzARhwR/AAABgglsb2NhbGhvc3QwDwYDVR0TAQH/
BAUwAwEB/zANBgkqhkiG9w0BAQsFAAOCAQEAT03wdJ/S/vnq/vfhnBEvefWLBmC1
Wkts1J9Img0ldXu91IZWsrVz2tQArkf22Rur8NgUw8SSgG37TSGurX7/AOXjSeie
5HLVGSShVeq1FCAHdKQiJlZYpiXDnanzhphqVwTBG6S7ViuAvMU62WDGJnYekWz1
IYa0IA5oLPmPc71Vp9/LdCZQIR6IKeI20C95R4lfJxJP8xf8kHCfoJxH6MwNe4Ah
h3MULpIFj//zHroswJtQJt41Img+FAYF/KljOdeOpOSLt9czRcZnEfM2UIdOvg+m
6Q2SW/0KygbGX04RDqAzNpebnfEBeax2ve7f4w/3XpJxwW2pF/guGWgZ/A==
-----END CERTIFICATE-----
"""

TEST_KEY = """\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDHcihj0eSiFd7E
Ku+w4IOiL6DJgyLBIjuEErKX4ek9PPr1G9whtLssBCGLsIYRQk0d8GomF8GA37y0
fBFqPt9Om9TrNcoFFDwxIYttorpG1GS9LWXn0GzcBjcpU6uFpx+k5eCF92DuhrAx
uKL1y2MNdbB3izBer8a9wZo0JobwejVjnHS/SBU9EA/aUZ81m+ubtMGSXZ+RY0G7
D5BorhB4VPaYpt3yr/hDZRUK9QcVfOto3EZAt5QS8qmW7+9wI8RG2bad+qTQouLe
erty0YpT9WNS6L3BtIAJUsSO2Gk60QkmQV7HFffpD3CvEPMXIOgyyWRZ+mZYYDIA
zNT8p4eJAgMBAAECggEAOdyHlTX+c3uOzjB6q0DnT3Ur22pc+dT5mT5na6LRrL91
OwjjGzA4oPNt2/3RV0552va1hOmdbMr8DwxzbPRiioaxBa/sNP8C22oU7jCohAX4
V93E07Tm8AoplKa+ex7aElfShGsZRvnyQeqD9HUV/oCnOnc6CC5MpR52oyyON1Np
Ld0F79VHv3YklNvdT0ny8rkWfDNQ6BRbSZscxv0LiugAXRm/yVLdiWWHKiVYZa7q
PWFzoXuMPdfpXbovrt0dpnKEoC0sbGfkunP0rpYnl/bl1FRq8R9TepRAbYskD5Xr
ogbD5uxEpJR1MSrCc6sCGfWHPl4jR3VyjyCF+SgeVQKBgQD7l7MAZyKBar7Dsi0W
C4N27Xi7R0/b7Sxb9o9krFLxFsxwt2KeONcUlR5dLT36J56xa88TXxCotAQkcpHf
g9DGenElPUYx9WVDBZfpYwD3S46qmRxd12xnllTYCG0Lz/iihC18dy5AYgVluB7c
X/vNQqzHpKS9wgK/BFdiekf+ewKBgQDK8JmSjAylmR84+EwlYI5LLI7CzixobYSp
0wKOPZA7lvdpqDPgreU8+T7cYthJdw2pswBJQqJb0iG1jTwZajg+eWXR9RzsxPdZ
/SZsgWPHa+WnaEtohnBfhBT5mhHipukbfRXdQPGef8ReBL9VMsGNUa4pDMf9eQsI
a6yYr3N0ywKBgQDckPbWAJTonpuVVyxdqkRby/7POMqTRU9hZDv8B3NDdzhODQfB
LJWqrryK9XHjUD64zoohMnOZYxBKn8KxEI/EoW12N0zF2Zwn8MxoSGp9Ytk1SLvs
rUKVYd8J8gEfnPkeCQEToCyFNyoCLjOoAeHv5mcxM29WCLN9oSG27PsW5wKBgGpZ
O6F4kwgU/i+0rvLHbsomR4n+0XbILcVxNt2jlXok2vMbmlQbzQ3u7+o+Qmn9YcOU
conxyXOk4tVpdh07dM4IgDtO4CGT9qvJ5eDmzYssF+Vq2lmkWi8z4GoNO2IzZeVp
35Na/UO6YQWEJ2BWgOe17jbE4+kJDacUBhbdmvuRAoGBAMB1GMegyYMi7cSl+MOC
6jKH5Pn0gY2G8Kb05e/etdD7Y8JEKvIoGHtQPIytXoRazxJu85XFMAC1Yf7w50nR
V5w1Gq+92elhkVaB4rmpPZnLNoUUuhZa5pggmZsMHEmcKcduOicmLvYm9I/88hyd
mtFBN5/HFuGy3Yvxi+MCMeMs
-----END PRIVATE KEY-----
"""


@dataclass
class RunningCrm:
    """A running sample CRM: its base URL and in-process state."""

    url: str
    state: SampleCrm

    @property
    def faults(self) -> Faults:
        """The fault injector of this CRM."""
        return self.state.faults


@asynccontextmanager
async def running_crm(**kwargs: Any) -> AsyncIterator[RunningCrm]:
    """Serve :func:`router.samplecrm.make_app` ``(**kwargs)`` on 127.0.0.1 for the block."""
    app = make_app(**kwargs)
    runner, url = await start_sample_crm("127.0.0.1", 0, app)
    try:
        yield RunningCrm(url=url, state=state_of(app))
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving(app: web.Application, *, tls: Path | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port for the block; yields its base URL.
    ``tls``: a directory holding cert.pem/key.pem (see :func:`write_test_cert`)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def connector(settings: CrmSettings) -> AsyncIterator[RestConnector]:
    """A :class:`RestConnector` closed after the block."""
    conn = RestConnector(settings)
    try:
        yield conn
    finally:
        await conn.aclose()


@dataclass
class Scripted:
    """A server answering every request with ``reply(request_info)``; it logs the requests."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)


Reply = Callable[[dict[str, Any]], tuple[int, Any, dict[str, str]]]


@asynccontextmanager
async def scripted_server(
    reply: Reply, *, tls: Path | None = None
) -> AsyncIterator[Scripted]:
    """Serve ``reply`` for every path; ``tls``: a directory holding cert.pem/key.pem.

    ``reply`` gets ``{"method", "path", "path_qs", "raw_path", "query", "headers",
    "body"}`` and returns ``(status, body, headers)``; a ``str``/``bytes`` body is sent as
    is, anything else as JSON.
    """
    box = Scripted()

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        info = {
            "method": request.method, "path": request.path, "path_qs": request.path_qs,
            "raw_path": request.raw_path, "query": dict(request.query),
            "headers": dict(request.headers), "body": _parse(raw),
        }
        box.seen.append(info)
        status, body, headers = reply(info)
        if isinstance(body, bytes | str):
            return web.Response(status=status, body=body, headers=headers,
                                content_type="application/json")
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serving(app, tls=tls) as box.url:
        yield box


def _parse(raw: bytes) -> Any:
    """JSON when the body is JSON, else the raw bytes (None when empty)."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw


def write_test_cert(directory: Path) -> Path:
    """Write cert.pem and key.pem into ``directory``; return the certificate's path."""
    (directory / "cert.pem").write_text(TEST_CERT)
    (directory / "key.pem").write_text(TEST_KEY)
    return directory / "cert.pem"


#: A loopback port nothing listens on (bound, then released): a CRM address with no server.
closed_port = free_port
