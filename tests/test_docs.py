"""The documentation's own guarantees: the configuration reference covers every setting (it is
generated from the package's table), README's links lead somewhere, the packaging basics hold."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from runguard_autolog._config import MEANINGS, SHOWN_SETTINGS, env_name, reference

ROOT = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_has_every_setting_once_with_its_meaning():
    rows = reference()
    assert [row["variable"] for row in rows] == [env_name(name) for name in SHOWN_SETTINGS]
    assert set(MEANINGS) == set(SHOWN_SETTINGS)
    assert all(row["meaning"] and row["default"] for row in rows)
    defaults = {row["variable"]: row["default"] for row in rows}
    assert defaults["RUNGUARD_MAX_CALLS"] == "50" and defaults["RUNGUARD_STORE"] == "memory"
    assert "<!-- runguard:settings -->" in (ROOT / "docs" / "configuration.md").read_text()


def test_every_relative_link_of_the_readme_and_the_docs_leads_to_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_readme_is_short_and_names_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    assert 'pip install -e . && runguard demo' in text
    assert 'pip install -e ".[test]" && python3 -m pytest -q' in text
    assert "python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()  # the same test command


def test_packaging_basics():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    helped = subprocess.run([sys.executable, "-m", "runguard_autolog", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert helped.returncode == 0 and "demo" in helped.stdout and "report" in helped.stdout


def message_templates() -> list[str]:
    """Every message the package can print or raise: its strings and f-strings that begin with
    ``runguard:`` (or the shadow-mode prefix), placeholders as ``…``."""
    import ast

    found = set()
    for path in sorted((ROOT / "runguard_autolog").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            if text.startswith(("runguard: ", "runguard (shadow")):
                found.add(re.sub(r"%[sdr]", "…", text).replace("\n", " ").strip())
    return sorted(text for text in found if not any(other != text and other.startswith(text) for other in found))


def test_troubleshooting_lists_every_message_the_code_can_show():
    page = (ROOT / "docs" / "troubleshooting.md").read_text().replace("\\|", "|")
    missing = []
    for template in message_templates():
        shown = template.replace("`", "'")
        head = shown if len(shown) <= 120 else shown[:117].rstrip()
        if head not in page:
            missing.append(template)
    assert len(message_templates()) > 60
    assert not missing, f"not in docs/troubleshooting.md: {missing}"
