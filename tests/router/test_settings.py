"""Loading and validating the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.errors import ConfigError
from router.settings import Settings, load_settings

EXAMPLE = Path(__file__).parents[2] / "examples" / "config.yaml"


def test_example_config_loads() -> None:
    """examples/config.yaml is valid and says what the demo needs."""
    settings = load_settings(EXAMPLE)
    assert settings.agi.host == "127.0.0.1"
    assert settings.agi.port == 4573
    assert settings.ami.port == 5038
    assert settings.crm.base_url.startswith("http://127.0.0.1:")
    assert settings.path(settings.routing.rules) == EXAMPLE.parent / "rules.yaml"


CRM = "crm:\n  base_url: http://crm.example.com\n"


def test_minimal_file_gives_defaults(tmp_path: Path) -> None:
    """A file that only says where the CRM is gets every other default."""
    path = tmp_path / "c.yaml"
    path.write_text(CRM)
    settings = load_settings(path)
    assert settings.crm.base_url == "http://crm.example.com"
    assert settings.model_dump(exclude={"crm"}) == Settings().model_dump(exclude={"crm"})


@pytest.mark.parametrize(
    ("text", "field"),
    [("", "crm: missing"), ("agi: {port: 4573}\n", "crm: missing"),
     ("crm: {name: mine}\n", "crm.base_url: missing")],
)
def test_a_config_without_a_crm_address_is_refused(tmp_path: Path, text: str,
                                                   field: str) -> None:
    """No `crm:` section, or one without `base_url`, is an error saying what to add, not
    a silent default pointing at the sample CRM."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert field in str(info.value)
    assert "crm.base_url" in str(info.value)


def test_a_preset_with_its_own_address_needs_no_base_url(tmp_path: Path) -> None:
    """A CRM whose API has one address (HubSpot) takes it from its preset: the shipped
    examples/crm-hubspot.yaml, which gives none, loads with the preset's address. A CRM
    that each customer runs at an address of their own (Odoo) still needs base_url: its
    preset's is a placeholder. An unknown preset is reported as such, not as a missing
    address."""
    path = tmp_path / "c.yaml"
    path.write_text((EXAMPLE.parent / "crm-hubspot.yaml").read_text().replace(
        "${HUBSPOT_TOKEN}", "pat-test"))
    assert load_settings(path).crm.base_url == "https://api.hubapi.com"
    path.write_text("crm: {preset: odoo}\n")
    with pytest.raises(ConfigError, match=r"crm\.base_url: missing"):
        load_settings(path)
    path.write_text("crm: {preset: nosuchcrm}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "no such preset" in str(info.value)
    assert "crm.base_url: missing" not in str(info.value)


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR} takes the environment; ${VAR:-default} falls back to the default when the
    variable is unset or empty (as the shell does); ${VAR:-} may be empty on purpose."""
    monkeypatch.setenv("CR_SECRET", "s3cret")
    monkeypatch.setenv("CR_EMPTY", "")
    monkeypatch.delenv("CR_MISSING", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(CRM + "ami:\n  secret: ${CR_SECRET}\n  username: ${CR_MISSING:-router}\n"
                    "  host: ${CR_EMPTY:-10.0.0.5}\nadmin:\n  webhook_secret: ${CR_MISSING:-}\n")
    settings = load_settings(path)
    assert settings.ami.secret.get_secret_value() == "s3cret"
    assert settings.ami.username == "router"
    assert settings.ami.host == "10.0.0.5"
    assert settings.admin.webhook_secret.get_secret_value() == ""


def test_unset_variable_without_default_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset ${VAR} with no default is refused, naming the variable and the field
    (it used to become "" silently); every problem of the file is in the one error."""
    monkeypatch.delenv("CR_NOPE", raising=False)
    monkeypatch.delenv("CR_NOPE2", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(CRM + "ami:\n  secret: ${CR_NOPE}\nrouting:\n  queues: [a, '${CR_NOPE2}']\n"
                    "  default_queue: a\nagi:\n  port: 99999\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "ami.secret: ${CR_NOPE} is not set" in message
    assert "routing.queues[1]: ${CR_NOPE2} is not set" in message
    assert "agi.port" in message
    assert str(path) in message


def test_unset_token_variable_is_reported_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`admin.token: ${ADMIN_TOKEN}` with the variable unset says so, once: the empty
    value it would have left is not reported a second time."""
    monkeypatch.delenv("CR_ADMIN_TOKEN", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(CRM + "admin:\n  token: ${CR_ADMIN_TOKEN}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).count("admin.token") == 1
    assert "${CR_ADMIN_TOKEN} is not set" in str(info.value)


@pytest.mark.parametrize("admin", ["token: ''", "token: '${CR_EMPTY_TOKEN}'", "token: '  '"])
def test_empty_admin_token_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       admin: str) -> None:
    """An empty admin token (written, or from an empty variable) is an error, not a token
    nobody can present; leaving the setting out means no token."""
    monkeypatch.setenv("CR_EMPTY_TOKEN", "")
    path = tmp_path / "c.yaml"
    path.write_text(CRM + "admin:\n  " + admin + "\n")
    with pytest.raises(ConfigError, match=r"admin\.token: is empty"):
        load_settings(path)
    path.write_text(CRM + "admin:\n  host: 127.0.0.1\n")
    assert load_settings(path).admin.token.get_secret_value() == ""


def test_empty_key_secret_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis.key_secret keys the hash of every number stored in Redis: empty is refused."""
    monkeypatch.setenv("CR_EMPTY_SECRET", "")
    path = tmp_path / "c.yaml"
    path.write_text(CRM + "redis:\n  key_secret: ${CR_EMPTY_SECRET}\n")
    with pytest.raises(ConfigError, match=r"redis\.key_secret: is empty"):
        load_settings(path)


def test_default_queue_must_be_listed(tmp_path: Path) -> None:
    """When routing.queues lists the queues, routing.default_queue must be one of them."""
    path = tmp_path / "c.yaml"
    path.write_text(CRM + "routing:\n  queues: [support, vip]\n  default_queue: suport\n")
    with pytest.raises(ConfigError, match=r"default_queue .suport. is not in routing\.queues"):
        load_settings(path)


def test_session_deadline_outlives_the_decision(tmp_path: Path) -> None:
    """The FastAGI session deadline must leave room for the decision deadline."""
    path = tmp_path / "c.yaml"
    path.write_text(CRM + "agi: {session_timeout_s: 0.5}\nrouting: {deadline_ms: 800}\n")
    with pytest.raises(ConfigError, match="session_timeout_s"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("agi:\n  port: 99999\n", "agi.port"),
        ("agi:\n  prot: 4573\n", "agi.prot"),
        ("phone:\n  default_region: XX\n", "phone.default_region"),
        ("phone:\n  internal_pattern: '('\n", "phone.internal_pattern"),
        ("routing:\n  deadline_ms: 1\n", "routing.deadline_ms"),
        ("event_loop: libuv\n", "event_loop"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, text: str, where: str) -> None:
    """A wrong value or an unknown key is an error naming the file and the field."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert where in str(info.value)
    assert str(path) in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """Broken YAML is reported with its line number."""
    path = tmp_path / "c.yaml"
    path.write_text("agi:\n  port: 1\n bad: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+"):
        load_settings(path)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    """A YAML list at the top level is refused with a clear message."""
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path)


def test_secrets_from_files_and_never_printed(tmp_path: Path) -> None:
    """`<secret>_file:` reads the secret from a file (relative to the config, trailing
    newline dropped); secrets print as asterisks in the settings' repr and JSON dump;
    giving both forms or an unreadable file is a ConfigError naming the field."""
    from router.errors import ConfigError

    (tmp_path / "ami.secret").write_text("ami-s3cret\n")
    (tmp_path / "crm.token").write_text("crm-t0ken")
    path = tmp_path / "c.yaml"
    path.write_text("ami: {secret_file: ami.secret}\n"
                    f"crm: {{base_url: 'http://crm.example.com', "
                    f"auth: {{type: bearer, token_file: {tmp_path / 'crm.token'}}}}}\n"
                    "admin: {webhook_secret: hook-s3cret}\n")
    settings = load_settings(path)
    assert settings.ami.secret.get_secret_value() == "ami-s3cret"
    assert settings.crm.auth.token.get_secret_value() == "crm-t0ken"
    shown = repr(settings) + settings.model_dump_json() + str(settings.model_dump())
    for secret in ("ami-s3cret", "crm-t0ken", "hook-s3cret", "change-me"):
        assert secret not in shown
    path.write_text("ami: {secret: a, secret_file: ami.secret}\n")
    with pytest.raises(ConfigError, match=r"ami\.secret_file: give secret or secret_file"):
        load_settings(path)
    path.write_text("admin: {token_file: missing.txt}\n")
    with pytest.raises(ConfigError, match=r"admin\.token_file: cannot read the secret file"):
        load_settings(path)
