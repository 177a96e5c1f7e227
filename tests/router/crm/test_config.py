"""The ``crm:`` section: defaults, the example files, and error messages naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.crm.config import CrmSettings
from router.errors import ConfigError
from router.settings import load_settings

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _load(tmp_path: Path, crm_yaml: str) -> CrmSettings:
    config = tmp_path / "config.yaml"
    config.write_text("crm:\n  base_url: http://crm.example.com\n"
                      + "\n".join("  " + line for line in crm_yaml.splitlines()))
    return load_settings(config).crm


@pytest.mark.parametrize(
    ("crm_yaml", "message"),
    [
        ("auth: {type: oauth}", "crm.auth.type: Input should be 'none', 'bearer'"),
        ("auth: {type: bearer}", "crm.auth: auth type bearer needs crm.auth.token"),
        ("auth: {type: basic, username: 'a:b'}", "must not contain ':'"),
        ("base_url: ftp://crm", "crm.base_url: must start with http"),
        ("timeout_s: 0", "crm.timeout_s: Input should be greater than 0"),
        ("lookup: {url: '/c?phone={phone}'}",
         "crm.lookups.0.steps.0.url: unknown name"),
        ("lookup: {params: {q: '{e164|bogus}'}}",
         "crm.lookups.0.steps.0.params: q: unknown filter 'bogus'"),
        ("lookup: {url: 'contacts'}", "crm.lookups.0.steps.0.url: must be a path"),
        ("lookup: {multiple: cheapest}", "crm.lookups.0.multiple.rule: Input should be"),
        ("lookup: {fields: {phone: x}}",
         "crm.lookups.0.fields.phone: Extra inputs are not permitted"),
        ("activity: {url: /a, body: {x: '{e164}'}}",
         "crm.records.0.body: x: unknown"),
        ("activity: {url: /a, body: {}, fields: {}}", "give either body or fields"),
        ("changed: {cursor: {type: path, path: null}}", "needs crm.changed.cursor.path"),
        ("changed: {url: '/c?since={cursor}&x={record.id}'}", "crm.changed.url"),
        ("recordings: {mode: stream, url: /r}", "crm.recordings.mode"),
        ("recordings: {url: '/r/{file}'}", "crm.recordings.url: unknown"),
        ("lookup: {url: '/c/{e164'}", "unbalanced brace"),
        ("verify_ssl: false", "crm.verify_ssl: Extra inputs are not permitted"),
    ],
)
def test_bad_crm_section_names_the_field(tmp_path: Path, crm_yaml: str, message: str) -> None:
    """Each invalid crm setting raises ConfigError whose text names the field."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, crm_yaml)
    assert message in str(info.value)
    assert "config.yaml" in str(info.value)


def test_defaults_verify_tls_and_fit_the_sample_crm(tmp_path: Path) -> None:
    """An empty crm section verifies TLS, looks up the sample CRM, and posts nothing."""
    crm = _load(tmp_path, "name: x")
    assert crm.verify_tls is True
    assert crm.lookup.steps[0].url == "/api/customers"
    assert crm.lookup.steps[0].params == {"phone": "{e164}"}
    assert crm.records == []


def test_secrets_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``${CRM_TOKEN}`` in the auth section is taken from the environment."""
    monkeypatch.setenv("CRM_TOKEN", "from-env")
    crm = _load(tmp_path, "auth: {type: bearer, token: '${CRM_TOKEN}'}")
    assert crm.auth.token.get_secret_value() == "from-env"
    assert crm.auth.secrets == ["from-env"]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("crm-*.yaml")))
def test_example_files_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every examples/crm-*.yaml snippet validates as a crm section, with lookups and a
    call step, and every override it makes lands on an existing preset piece."""
    for var in ("CRM_TOKEN", "HUBSPOT_TOKEN", "ZOHO_TOKEN", "SALESFORCE_TOKEN", "ODOO_API_KEY",
                "PIPEDRIVE_TOKEN", "ESPOCRM_API_KEY"):
        monkeypatch.setenv(var, "x")
    from router.settings import expand_env

    data = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    crm = CrmSettings.model_validate(expand_env(data["crm"]))
    assert crm.lookup.fields.id
    assert crm.record_step("call") is not None
    if crm.preset:
        preset_lookups = {x.name for x in CrmSettings.model_validate(
            {"preset": crm.preset}).lookups}
        assert {x.name for x in crm.lookups} == preset_lookups


def test_crm_secrets_are_secret_and_readable_from_files(tmp_path: Path) -> None:
    """crm.secrets values are SecretStr: ``<name>_file`` reads one from a file (relative
    to the config), templates see the value in clear, printing the settings never shows
    it, giving both forms is a ConfigError naming the field."""
    from router.crm.rest import RestConnector

    (tmp_path / "odoo.key").write_text("odoo-k3y-from-file\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("crm:\n  base_url: http://127.0.0.1:9\n  secrets:\n"
                   "    api_key_file: odoo.key\n    other: in-line-s3cret\n"
                   "  lookup:\n    url: /find\n    params: {k: '{secrets.api_key}'}\n")
    settings = load_settings(cfg)
    crm = settings.crm
    assert crm.secrets["api_key"].get_secret_value() == "odoo-k3y-from-file"
    assert set(crm.all_secrets) >= {"odoo-k3y-from-file", "in-line-s3cret"}
    shown = repr(settings) + settings.model_dump_json() + str(settings.model_dump())
    assert "odoo-k3y-from-file" not in shown
    assert "in-line-s3cret" not in shown
    plan = RestConnector(crm).plan
    _method, _url, params, _headers, _body = plan.lookups[0].steps[0].request.render(
        {**plan.base, "_rt": plan.runtime, "e164": "+1"})
    assert params == {"k": "odoo-k3y-from-file"}
    cfg.write_text("crm:\n  secrets: {api_key: a, api_key_file: odoo.key}\n")
    with pytest.raises(ConfigError, match=r"crm\.secrets\.api_key_file: give api_key"):
        load_settings(cfg)
