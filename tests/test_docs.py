"""The README stays true: every vendor setting is documented, and the two fresh-machine
commands it names exist and are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from vendor_api.settings import VendorSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_vendor_setting_is_in_the_configuration_table():
    for name, field in VendorSettings.model_fields.items():
        variable = "REDIS_URL" if name == "redis_url" else f"VENDOR_{name.upper()}"
        assert f"`{variable}`" in README, f"{variable} is not documented in README.md"


def test_readme_commands_exist_and_ci_runs_the_test_command():
    commands = re.findall(r"^bash (scripts/\S+\.sh)", README, flags=re.MULTILINE)
    assert commands[:2] == ["scripts/demo.sh", "scripts/test.sh"]
    for script in commands:
        assert (ROOT / script).is_file(), script
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
