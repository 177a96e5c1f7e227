"""Audit the project's installed dependencies against published advisories (pip-audit).

Writes the exact versions installed in the project's virtualenv (``pip freeze``, the
project itself left out) to ``.ci/requirements.lock`` and asks pip-audit about each,
from a virtualenv of its own (``.venv-audit``, so the audit tool's dependencies do not
mix with the project's). Exit status: 0 nothing known; 1 a known vulnerability, or some
dependencies could not be looked up; 3 no advisory source answered at all (PyPI's JSON
API and OSV unreachable from this machine): that is said, never reported as "clean".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "requirements.lock"


def main() -> int:
    venv = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".venv"
    auditor = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / ".venv-audit"
    frozen = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True).stdout
    pins = sorted(line for line in frozen.splitlines() if "==" in line)
    LOCK.write_text("# exact versions of ./dev test's virtualenv, audited by .ci/audit.py\n"
                    + "\n".join(pins) + "\n")
    run = subprocess.run(
        [str(auditor / "bin" / "pip-audit"), "-r", str(LOCK), "--no-deps", "--disable-pip",
         "-f", "json", "--progress-spinner", "off"],
        capture_output=True, text=True)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        print(f"pip-audit failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
        return 1
    deps = report.get("dependencies", [])
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if d.get("skip_reason")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            print(f"VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    if deps and len(skipped) == len(deps):
        print(f"pip-audit could not look up any of the {len(deps)} dependencies: no advisory "
              f"source answered (first reason: {skipped[0]['skip_reason']}). NOT audited.")
        return 3
    for dep in skipped:
        print(f"not audited: {dep['name']} {dep.get('version', '')}: {dep['skip_reason']}")
    if vulnerable or skipped:
        return 1
    print(f"pip-audit: {len(deps)} pinned dependencies, no known vulnerability")
    return 0


if __name__ == "__main__":
    sys.exit(main())
