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


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file is a valid config with every default."""
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_settings(path).model_dump() == Settings().model_dump()


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR} takes the environment; ${VAR:-default} falls back to the default."""
    monkeypatch.setenv("CR_SECRET", "s3cret")
    monkeypatch.delenv("CR_MISSING", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("ami:\n  secret: ${CR_SECRET}\n  username: ${CR_MISSING:-router}\n")
    settings = load_settings(path)
    assert settings.ami.secret.get_secret_value() == "s3cret"
    assert settings.ami.username == "router"


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
                    f"crm: {{auth: {{type: bearer, token_file: {tmp_path / 'crm.token'}}}}}\n"
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
