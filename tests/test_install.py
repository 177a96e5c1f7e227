"""callroute as a user gets it: the wheel built from this tree, installed into a fresh
virtualenv, run from a folder outside the repository (no examples/ beside it).

The wheel is built offline (``--no-build-isolation``: setuptools comes from the test
extra) from a copy of the files a release contains. The fresh virtualenv gets callroute
from that wheel only; its dependencies are the test environment's own (a ``.pth`` line),
so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
RELEASED = ("pyproject.toml", "README.md", "router", "dialplan", "ami", "examples",
            "asterisk-conf")

pytestmark = pytest.mark.slow


def test_every_package_of_the_tree_is_listed_in_pyproject() -> None:
    """pyproject.toml lists its packages (two are folders mapped into router): every
    Python package of the tree must be in that list, or an install would miss it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for top in ("router", "dialplan", "ami") for init in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set()


@pytest.fixture(scope="module")
def callroute_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bin/callroute`` of a fresh virtualenv with callroute installed from its wheel."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in RELEASED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=120)
    wheel = next(wheels.glob("callroute-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=120)
    return venv / "bin" / "callroute"


def run(binary: Path, *args: str, cwd: Path, redis: RedisServer,
        timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the installed callroute in ``cwd``, its Redis pointed at the test one."""
    env = {**os.environ, "CALLROUTE_REDIS_URL": redis.url}
    return subprocess.run([str(binary), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_check_and_demo_run_anywhere(callroute_bin: Path, tmp_path: Path,
                                     redis_server: RedisServer) -> None:
    """Outside the repository, with no config file around, `check` validates the example
    config that comes with the package and `demo` plays its calls."""
    check = run(callroute_bin, "check", cwd=tmp_path, redis=redis_server)
    assert check.returncode == 0, check.stderr
    assert "site-packages/router/_data/examples" in check.stdout
    assert "rules OK" in check.stdout
    assert "using the example config" in check.stderr
    demo = run(callroute_bin, "demo", cwd=tmp_path, redis=redis_server)
    assert demo.returncode == 0, demo.stderr
    assert "C-1001 Li Lei" in demo.stdout
    assert "vip-owner" in demo.stdout


def test_init_then_check(callroute_bin: Path, tmp_path: Path,
                         redis_server: RedisServer) -> None:
    """`callroute init site` writes the starting files from the package data, including the
    Asterisk snippets, and `check` accepts the config it wrote."""
    init = run(callroute_bin, "init", "site", cwd=tmp_path, redis=redis_server)
    assert init.returncode == 0, init.stderr
    site = tmp_path / "site"
    assert (site / "asterisk" / "extensions_callroute.conf").read_text() == \
        (ROOT / "asterisk-conf" / "extensions_callroute.conf").read_text()
    assert (site / "crm-examples" / "crm-hubspot.yaml").is_file()
    check = run(callroute_bin, "check", "--config", "site/config.yaml", cwd=tmp_path,
                redis=redis_server)
    assert check.returncode == 0, check.stderr
    assert f"config OK: {site}" in check.stdout
