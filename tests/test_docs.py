"""The docs cannot drift: generated reference, policy tables, snippets, commands and links are checked."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from nvme_tier import cli
from nvme_tier.config import CONFIG_KEY, OffloadStatesConfig
from nvme_tier.policy import CPU_DEFAULT, NVME_DEFAULT

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
OWN_DOCS = [
    "quickstart.md",
    "configuration.md",
    "policy.md",
    "backends.md",
    "troubleshooting.md",
    "integrations.md",
]
SNIPPET_DOCS = [DOCS / name for name in OWN_DOCS] + [REPO / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(path.read_text()) if tag == lang]


def test_configuration_reference_is_generated_from_the_model():
    current = (DOCS / "configuration.md").read_text()
    assert current == cli.render_config_reference(), (
        "docs/configuration.md is out of date: python -m nvme_tier docs-config > docs/configuration.md"
    )


def test_every_config_key_is_documented():
    text = (DOCS / "configuration.md").read_text()
    for name, field in OffloadStatesConfig.model_fields.items():
        assert f"| `{name}` |" in text
        nested = field.annotation
        if isinstance(nested, type) and hasattr(nested, "model_fields"):
            for sub in nested.model_fields:
                assert f"| `{name}.{sub}` |" in text


def test_policy_defaults_table_matches_the_code():
    text = (DOCS / "policy.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)` \|$", text, re.M)
    table = {state: (nvme, cpu) for state, nvme, cpu in rows}
    expected = {s.value: (NVME_DEFAULT[s].value, CPU_DEFAULT[s].value) for s in NVME_DEFAULT}
    assert table == expected


@pytest.mark.parametrize("path", SNIPPET_DOCS, ids=lambda p: p.name)
def test_json_snippets_are_valid_configs(path):
    for body in blocks(path, "json"):
        text = body.strip()
        data = json.loads(text if text.startswith("{") else "{" + text + "}")
        if CONFIG_KEY in data:
            OffloadStatesConfig.parse(data[CONFIG_KEY])


@pytest.mark.parametrize("path", SNIPPET_DOCS, ids=lambda p: p.name)
def test_python_snippets_compile(path):
    for body in blocks(path, "python"):
        compile(body, str(path), "exec")


def _cli_lines(path: Path) -> list[list[str]]:
    found = []
    for body in blocks(path, "bash"):
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip()
            for prefix in ("nvme-tier ", "python -m nvme_tier "):
                if line.startswith(prefix):
                    found.append(shlex.split(line[len(prefix) :]))
    return found


@pytest.mark.parametrize("path", SNIPPET_DOCS, ids=lambda p: p.name)
def test_cli_commands_in_docs_parse(path):
    parser = cli.build_parser()
    for argv in _cli_lines(path):
        args, extra = parser.parse_known_args(argv)
        assert args.command == "bench" or not extra, (path.name, argv, extra)


def _anchors(md: Path) -> set[str]:
    """GitHub heading anchors: lowercase, punctuation dropped, spaces to dashes."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", md.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("name", OWN_DOCS)
def test_relative_links_resolve(name):
    doc = DOCS / name
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{name}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{name}: no heading for #{anchor} in {dest.name}"


def test_troubleshooting_covers_the_usual_failures():
    headings = " ".join(re.findall(r"^## (.+)$", (DOCS / "troubleshooting.md").read_text(), re.M)).lower()
    for topic in ("libaio", "tmpfs", "o_direct", "ulimit -l", "disk full", "stale"):
        assert topic in headings, topic
