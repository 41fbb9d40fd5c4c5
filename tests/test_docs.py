"""The docs cannot drift: generated reference, policy tables, snippets, commands and links are checked."""

from __future__ import annotations

import contextlib
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
ALL_DOCS = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]
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


PREFIXES = ("nvme-tier ", "python -m nvme_tier ")
INLINE = re.compile(r"`([^`\n]+)`")


def _commands_in(text: str) -> list[str]:
    """Every quoted command line: after a prefix, up to a comment, `&&`, `;` or a pipe."""
    found = []
    for prefix in PREFIXES:
        for match in re.finditer(re.escape(prefix), text):
            rest = text[match.end() :].split("\n", 1)[0]
            rest = re.split(r"\s#|&&|;|\|\||\s>", rest, maxsplit=1)[0]
            rest = re.sub(r"<[^>]*>", "X", rest)  # a placeholder such as <your offload path>
            found.append(rest.strip())
    return found


def _cli_lines(path: Path) -> list[list[str]]:
    """The argv of every `nvme-tier ...`/`python -m nvme_tier ...` in a doc's bash blocks and inline code."""
    text = path.read_text()
    quoted = [body for tag, body in FENCE.findall(text) if tag in ("bash", "")]
    quoted += INLINE.findall(FENCE.sub("", text))
    found = []
    for chunk in quoted:
        for command in _commands_in(chunk):
            if " | " in command:  # the README's list of subcommands: `check | build-ops | status PATH`
                found += [shlex.split(alt) for alt in command.split(" | ")]
            else:
                found.append(shlex.split(command))
    return [argv for argv in found if argv]


def _placeholders(argv: list[str]) -> list[str]:
    """A doc's `...` stands for more arguments."""
    return [arg for arg in argv if arg != "..."]


@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda p: p.name)
def test_cli_commands_in_docs_parse(path):
    parser = cli.build_parser()
    for argv in _cli_lines(path):
        if argv[0] == "bench":
            from nvme_tier.bench.swap_bandwidth import build_parser as bench_parser

            with contextlib.suppress(SystemExit):  # --help exits 0; a bad flag fails below
                bench_parser().parse_args(_placeholders(argv[1:]))
                continue
            assert "--help" in argv or "-h" in argv, (path.name, argv)
            continue
        args, extra = parser.parse_known_args(_placeholders(argv))
        assert not extra, (path.name, argv, extra)


def test_docs_quote_commands_at_all():
    """The command test above reads inline code and bash blocks: it does see the quoted commands."""
    quoted = {tuple(argv[:1]) for path in ALL_DOCS for argv in _cli_lines(path)}
    names = {"check", "build-ops", "status", "clean", "bench", "demo", "docs-config"}
    assert names <= {argv[0] for argv in quoted if argv}, quoted


def _config_keys() -> set[str]:
    keys = set()
    for name, field in OffloadStatesConfig.model_fields.items():
        keys.add(name)
        nested = field.annotation
        if isinstance(nested, type) and hasattr(nested, "model_fields"):
            keys.update(f"{name}.{sub}" for sub in nested.model_fields)
    return keys


@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda p: p.name)
def test_config_keys_quoted_in_docs_exist(path):
    """`offload_states.KEY` and `"KEY": value` of the block, in prose, name real keys."""
    keys = _config_keys()
    text = path.read_text()
    for match in re.finditer(r"\boffload_states\.([a-z_]+(?:\.[a-z_]+)?)", text):
        dotted = match.group(1)
        if text[match.end() :].startswith(": unknown key"):
            continue  # an example of the error a typo gets
        assert dotted in keys or dotted.split(".")[0] in keys, (path.name, dotted)
    blocks = re.findall(r'"offload_states":\s*\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}', text)
    for block in blocks:
        for key in re.findall(r'"(\w+)"\s*:', re.sub(r"\{[^{}]*\}", "{}", block)):
            assert key in keys, (path.name, key)


def test_gpu_test_counts_match_the_junit_file():
    import xml.etree.ElementTree as ET

    suite = next(
        ET.parse(REPO / "benchmarks" / "results" / "tests_h100_junit.xml").getroot().iter("testsuite")
    )
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    minutes, seconds = divmod(round(float(suite.get("time"))), 60)
    text = " ".join((DOCS / "performance.md").read_text().split())
    assert f"gave {tests - skipped - failed} passed, {skipped} skipped" in text
    assert f"in {minutes} min {seconds} s on the H100" in text


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
