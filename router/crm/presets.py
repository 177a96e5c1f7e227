"""Presets: profiles of the generic connector for known CRMs, shipped with callroute.

``crm: {preset: hubspot, ...}`` starts from ``router/crm/presets/hubspot.yaml`` and the
rest of the section overrides it:

* mappings merge key by key (``auth: {token: ...}`` keeps the preset's ``type``);
* ``lookups``, ``records``, ``webhooks`` and a lookup's ``steps`` are lists of named
  items: an item whose ``name`` is in the preset's list merges into that item
  (``enabled: false`` turns it off; a preset's webhooks ship off: ``enabled: true`` and
  the signature's secret turn one on), an item with a new name is appended;
* any other list, and any other value, replaces the preset's.

``${VAR}`` and ``${VAR:-default}`` in a preset are read from the environment, as in the
config file.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

_NAME = re.compile(r"^[a-z0-9_-]+$")
#: Lists merged item by item on their ``name``.
NAMED_LISTS = frozenset({"lookups", "records", "steps", "webhooks"})


def available() -> list[str]:
    """The names of the presets shipped with callroute."""
    folder = resources.files("router.crm").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


@lru_cache(maxsize=32)
def _read(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"crm.preset {name!r}: not a preset name")
    file = resources.files("router.crm").joinpath("presets", f"{name}.yaml")
    if not file.is_file():
        raise ValueError(f"crm.preset {name!r}: no such preset (known: {', '.join(available())})")
    return file.read_text(encoding="utf-8")


def load_preset(name: str) -> dict[str, Any]:
    """The preset's ``crm:`` section as data, environment variables expanded."""
    from router.settings import expand_env

    data = yaml.safe_load(_read(name))
    if not isinstance(data, dict) or not isinstance(data.get("crm"), dict):
        raise ValueError(f"crm.preset {name!r}: the file has no crm: mapping")
    section = expand_env(data["crm"])
    if not isinstance(section, dict):  # pragma: no cover - expand_env keeps the shape
        raise ValueError(f"crm.preset {name!r}: the crm: section is not a mapping")
    return {str(k): v for k, v in section.items()}


def apply_preset(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset ``name`` with ``overrides`` (a ``crm:`` section) merged over it."""
    merged: dict[str, Any] = merge(
        load_preset(name), {k: v for k, v in overrides.items() if k != "preset"})
    merged["preset"] = name
    return merged


def merge(base: Any, override: Any, key: str = "") -> Any:
    """``override`` merged over ``base`` by the rules in this module's docstring."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, str(k)) if k in base else v
        return out
    if key in NAMED_LISTS and _named(base) and _named(override):
        out_list = [dict(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(out_list)}
        for item in override:
            if item["name"] in index:
                i = index[item["name"]]
                out_list[i] = merge(out_list[i], item)
            else:
                out_list.append(item)
        return out_list
    return override


def _named(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)
