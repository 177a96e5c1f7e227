"""Audit the project's installed dependencies against published advisories (pip-audit).

Writes the exact versions installed in the project's virtualenv (``pip freeze``, the
project itself left out) to ``.ci/requirements.lock`` and asks pip-audit about each,
from a virtualenv of its own (``.venv-audit``, so the audit tool's dependencies do not
mix with the project's).

pip-audit asks PyPI about each pinned release (``/pypi/<name>/<version>/json``) or OSV.
Where neither answers (a build machine whose PyPI proxy serves only the project
endpoint, as the development VM's does), the same advisories are read from PyPI's
*project* endpoint (``/pypi/<name>/json``): its ``vulnerabilities`` are those of the
project's latest release, so they audit every pin that IS the latest release; a pin
older than that cannot be audited this way and is named.

Exit status: 0 every pin audited, nothing known; 1 a known vulnerability (or pip-audit
itself could not look some pins up); 3 no advisory source answered at all: that is
said, never reported as "clean"; 4 no vulnerability known, but some pins could not be
audited (named, one line each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "requirements.lock"
#: PyPI's JSON API (CALLROUTE_AUDIT_PYPI points the fallback at another one, for its tests)
PYPI = os.environ.get("CALLROUTE_AUDIT_PYPI", "https://pypi.org/pypi")
OK, VULNERABLE, NONE_AUDITED, PARTLY_AUDITED = 0, 1, 3, 4


@dataclass
class Findings:
    """What the PyPI project endpoint said of the pins."""

    audited: int = 0
    vulnerable: list[str] = field(default_factory=list)  # one line per advisory
    unaudited: list[str] = field(default_factory=list)  # one line per pin


def freeze(venv: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The virtualenv's exact versions, written to LOCK: ``(name, version)`` pairs, and the
    requirements installed from a URL or path (no release PyPI has advisories for)."""
    frozen = subprocess.run(  # noqa: S603 (a fixed argv: our own virtualenv's pip)
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True).stdout
    lines = [ln.strip() for ln in frozen.splitlines() if ln.strip() and not ln.startswith("#")]
    pins = sorted(line for line in lines if "==" in line)
    unpinned = [line for line in lines if "==" not in line]  # name @ URL, or a path
    LOCK.write_text("# exact versions of ./dev test's virtualenv, audited by .ci/audit.py\n"
                    + "\n".join(pins) + "\n")
    return [(name, version) for name, _, version in (p.partition("==") for p in pins)], unpinned


def advisory_line(name: str, version: str, vuln: dict[str, Any]) -> str:
    """One line for an advisory of ``name`` ``version``."""
    fixed = ", ".join(vuln.get("fixed_in") or vuln.get("fix_versions") or []) or "no fix yet"
    return f"VULNERABLE {name} {version}: {vuln.get('id', '?')} (fixed in {fixed})"


def project_json(name: str, base: str = PYPI, timeout_s: float = 30.0) -> dict[str, Any]:
    """PyPI's project endpoint for ``name``."""
    url = f"{base}/{name}/json"
    if not url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise ValueError(f"refusing to fetch {url}")
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 (checked above)
        data: dict[str, Any] = json.load(answer)
    return data


def audit_pin(name: str, version: str, base: str = PYPI) -> tuple[list[str], str | None]:
    """``(advisory lines, None)`` for an audited pin, ``([], why not)`` otherwise."""
    try:
        data = project_json(name, base)
    except (OSError, ValueError) as exc:  # URLError/HTTPError are OSErrors
        return [], f"not audited: {name} {version}: PyPI did not answer ({exc})"
    info = data.get("info") if isinstance(data, dict) else None
    latest = str(info.get("version") or "") if isinstance(info, dict) else ""
    if latest != version:
        return [], (f"not audited: {name} {version}: PyPI's advisories are for its latest "
                    f"release ({latest or 'unknown'}) and the release endpoint is unreachable")
    listed = data.get("vulnerabilities")
    if not isinstance(listed, list):  # a mirror's copy of the endpoint: it says nothing
        return [], (f"not audited: {name} {version}: PyPI's answer carries no advisories "
                    "list (a mirror or proxy's copy of the project endpoint?)")
    vulns = [v if isinstance(v, dict) else {"id": str(v)[:80]} for v in listed]
    vulns = [v for v in vulns if not v.get("withdrawn")]
    return [advisory_line(name, version, v) for v in vulns], None


def audit_latest(pins: list[tuple[str, str]], base: str = PYPI) -> Findings:
    """Audit ``pins`` through PyPI's project endpoint (8 requests at a time)."""
    found = Findings()
    with ThreadPoolExecutor(8) as pool:
        for lines, why_not in pool.map(lambda p: audit_pin(p[0], p[1], base), pins):
            if why_not is None:
                found.audited += 1
                found.vulnerable += lines
            else:
                found.unaudited.append(why_not)
    return found


def verdict(found: Findings, total: int) -> int:
    """Print the fallback's findings; return the exit status."""
    for line in found.vulnerable + found.unaudited:
        print(line)
    if found.vulnerable:
        return VULNERABLE
    if found.audited == 0:
        print(f"none of the {total} dependencies could be audited: no advisory source "
              "answered. NOT audited.")
        return NONE_AUDITED
    via = "PyPI's project endpoint (pip-audit's sources were unreachable)"
    if found.unaudited:
        print(f"audited {found.audited} of {total} pinned dependencies through {via}: "
              f"no known vulnerability; {len(found.unaudited)} NOT audited (above)")
        return PARTLY_AUDITED
    print(f"audited all {total} pinned dependencies through {via}: no known vulnerability")
    return OK


def pip_audit(auditor: Path) -> dict[str, Any] | None:
    """pip-audit's JSON report on LOCK, or None when it failed outright (said)."""
    run = subprocess.run(  # noqa: S603 (a fixed argv: the audit virtualenv's pip-audit)
        [str(auditor / "bin" / "pip-audit"), "-r", str(LOCK), "--no-deps", "--disable-pip",
         "-f", "json", "--progress-spinner", "off"],
        capture_output=True, text=True)
    try:
        report: dict[str, Any] = json.loads(run.stdout)
    except ValueError:
        print(f"pip-audit failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
        return None
    return report


def canonical(name: str) -> str:
    """A project name as PyPI compares them (PEP 503): ``PyYAML`` and ``pyyaml`` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def judge(report: dict[str, Any], pins: list[tuple[str, str]]) -> int:
    """Print what pip-audit's report says of ``pins``; return the exit status. A pin the
    report does not mention (or an empty report) is named as not audited, never clean."""
    deps = report.get("dependencies") or []
    skipped = [d for d in deps if d.get("skip_reason")]
    if deps and len(skipped) == len(deps):
        print(f"pip-audit could not look up any of the {len(deps)} dependencies (first "
              f"reason: {skipped[0]['skip_reason']}); reading PyPI's project endpoint")
        return verdict(audit_latest(pins), len(pins))
    vulnerable = [advisory_line(d["name"], d["version"], v)
                  for d in deps for v in d.get("vulns") or []]
    answered = {canonical(str(d.get("name", ""))) for d in deps}
    unanswered = [(n, v) for n, v in pins if canonical(n) not in answered]
    for line in vulnerable:
        print(line)
    for dep in skipped:
        print(f"not audited: {dep['name']} {dep.get('version', '')}: {dep['skip_reason']}")
    for name, version in unanswered:
        print(f"not audited: {name} {version}: pip-audit's report does not mention it")
    if vulnerable or skipped or unanswered:
        return VULNERABLE
    print(f"pip-audit: {len(deps)} pinned dependencies, no known vulnerability")
    return OK


def main() -> int:
    venv = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".venv"
    auditor = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / ".venv-audit"
    pins, unpinned = freeze(venv)
    report = pip_audit(auditor)
    if report is None:
        return VULNERABLE
    status = judge(report, pins)
    for line in unpinned:
        print(f"not audited: {line}: installed from a URL or path, not a PyPI release")
    return PARTLY_AUDITED if status == OK and unpinned else status


if __name__ == "__main__":
    sys.exit(main())
