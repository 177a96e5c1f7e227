"""Configuration of the CRM connector (the ``crm:`` section of the config file).

PLACEHOLDER: owned by the CRM connector work; expanded there.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CrmSettings(BaseModel):
    """How to reach the CRM and map its answers."""

    model_config = ConfigDict(extra="forbid")

    name: str = "crm"
    base_url: str = "http://127.0.0.1:8088"
    timeout_s: float = 2.0
