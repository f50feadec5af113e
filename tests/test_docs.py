"""The README, the example workflow and the pre-commit hook tell a newcomer things that work.

lorarecipe is not on PyPI: every install it documents is from the git repository at a pinned commit
(or ``-e`` from a clone), with the ``[build]`` extra wherever something is built; the pre-commit
example pins a commit, not a tag that does not exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "examples" / "gitops" / "lorarecipe.yml", REPO / ".pre-commit-hooks.yaml"]


def test_every_documented_install_of_lorarecipe_works_without_pypi() -> None:
    installs = [
        (doc.name, line.strip())
        for doc in DOCS
        for line in doc.read_text().splitlines()
        if re.search(r"pip install\b.*lorarecipe|pip install -e", line)
    ]
    assert len(installs) >= 5
    for doc, line in installs:
        assert (
            "git+https://github.com/lorarecipe/lorarecipe@" in line
            or "$LORARECIPE" in line
            or ('pip install -e ".[' in line)
        ), (doc, line)
        assert not re.search(r"pip install (-e )?\.?(\s|$)", line), (doc, line)  # a bare `pip install -e .`


def test_the_example_workflow_pins_a_commit_and_builds_with_the_build_extra() -> None:
    workflow = yaml.safe_load((REPO / "examples" / "gitops" / "lorarecipe.yml").read_text())
    # a commit to fill in (no tag, no branch: the build must not change under the user)
    assert workflow["env"]["LORARECIPE"] == "git+https://github.com/lorarecipe/lorarecipe@<COMMIT-SHA>"
    steps = {
        job: " ".join(str(s.get("run", "")) for s in spec["steps"]) for job, spec in workflow["jobs"].items()
    }
    assert 'pip install "lorarecipe @ $LORARECIPE"' in steps["validate"]
    assert 'pip install "lorarecipe[build] @ $LORARECIPE"' in steps["build"]
    assert steps["build"].index("pip install torch") < steps["build"].index("lorarecipe[build]")


def test_the_pre_commit_example_pins_a_commit() -> None:
    text = (REPO / ".pre-commit-hooks.yaml").read_text()
    rev = re.search(r"#\s+rev: (\S+)", text)
    assert rev is not None and rev.group(1) == "<COMMIT-SHA>"
    assert "no release tags" in text
