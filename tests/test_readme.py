"""README speaks to users: every environment variable the code reads is listed, links stay inside
the repository, no issue-tracker references."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CODE = ("training", "swat_deploy", "swat_native", "models", "cli")


def _env_vars_read() -> set[str]:
    """SWAT_* names the code reads (os.environ / getenv, directly or through a NAME_ENV constant)."""
    names = set()
    for pkg in CODE:
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            if "environ" not in text and "getenv" not in text:
                continue
            names.update(re.findall(r"[\"']b?(SWAT_[A-Z0-9_]+)[\"']", text))
            names.update(re.findall(r"b\"(SWAT_[A-Z0-9_]+)\"", text))
    return names


def test_every_environment_variable_the_code_reads_is_in_the_readme() -> None:
    section = README.split("### Environment variables", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(SWAT_[A-Z0-9_]+)`", section))
    read = _env_vars_read()
    assert {"SWAT_DATA_DIR", "SWAT_AUTOTUNE", "SWAT_DIST_TIMEOUT"} <= read  # the scan finds them
    assert sorted(read - listed) == []


def test_links_stay_in_the_repository_and_no_issue_numbers() -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        assert not re.match(r"[a-z]+://", target) and not target.startswith("../"), target
        assert (ROOT / target.split("#")[0]).exists(), target
    assert not re.search(r"(?<![\w&])#\d+\b|\bissue \d+", README, re.IGNORECASE)
