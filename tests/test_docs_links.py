"""The manual cannot point nowhere: every relative link in README.md and docs/*.md names a file
that exists, and an anchor (`file.md#heading`) a heading that file has, so that moving or
renaming a page or a section fails here instead of in a reader's browser. And
configs/checkpointer.yaml, which says it shows every key, shows every key of the config model
and no key the model lacks (commented out or not).

That the shipped configs load and validate is tests/test_references.py's job.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from checkpointer.config.model import Config
from checkpointer.config.reference import sections
from tests.support.paths import ROOT

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

# [text](target) outside code; images too. Targets with a scheme (https:, mailto:) are not ours.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code, where a `[x](y)` is not a link."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor the page's headings make (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        base = anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(page.read_text())) if not _SCHEME.match(t)]


def test_the_manual_has_pages_and_links() -> None:
    # The checks below would pass on nothing: make sure they see the manual.
    assert ROOT / "docs" / "README.md" in PAGES and len(PAGES) > 10
    assert sum(len(links(p)) for p in PAGES) > 50


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file, or whose heading, does not exist."""
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading makes #{fragment}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_anchor_follows_github() -> None:
    assert anchor("Configuration: the main keys") == "configuration-the-main-keys"
    assert anchor("`workloads[].restore`") == "workloadsrestore"
    assert anchor("The tree came back twice?") == "the-tree-came-back-twice"
    assert anchor("Daemon memory on a 4 GB Redis") == "daemon-memory-on-a-4-gb-redis"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B\n\n## Over there\n")
    page = tmp_path / "a.md"
    page.write_text(
        "# A\n\n## Here\n\n[ok](#here) [ok](b.md#over-there) [gone](c.md) [no](b.md#here)\n"
        "`[code](d.md)`\n```\n[fenced](e.md)\n```\n[web](https://example.com/x.md)\n"
    )
    assert broken_links(page) == ["c.md: no such file", "b.md#here: no heading makes #here"]


# A key line of the example, commented out ("# key:", "#   - key:") or not.
_KEY = re.compile(r"^(?P<indent> *)(?P<item>- )?(?P<key>[a-z_0-9]+):(?:\s|$)")


def example_keys(text: str) -> set[str]:
    """The key paths (`workloads[].criu.tcp_close`) of a YAML file, its commented-out keys
    included: a comment "# " at the start of a line is taken away once, so that a key
    commented out keeps its place; prose in comments has no `key:` at its start."""
    out: set[str] = set()
    stack: list[tuple[int, str]] = []
    for raw in text.splitlines():
        line = re.sub(r"^( *)# ?", r"\1", raw, count=1)
        m = _KEY.match(line)
        if not m:
            continue
        indent = len(m.group("indent")) + (2 if m.group("item") else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m.group("item") and stack and not stack[-1][1].endswith("[]"):
            stack[-1] = (stack[-1][0], stack[-1][1] + "[]")
        stack.append((indent, m.group("key")))
        out.add(".".join(name for _, name in stack))
    return out


def model_keys() -> tuple[set[str], set[str]]:
    """(keys the example must show, keys it may show): a section whose model appeared before
    (a workload's retention: the top-level one's keys) need not be spelled out twice."""
    required: set[str] = set()
    allowed: set[str] = set()
    seen: set[type] = set()
    for prefix, model, fields in sections(Config):
        keys = {f"{prefix}{name}" for name, _ in fields}
        allowed |= keys
        if model not in seen:
            required |= keys
        seen.add(model)
    return required, allowed


def test_example_keys_reads_commented_keys() -> None:
    text = "a: 1\n# b:\n#   c: 2   # why\n# Prose: no key\nl:\n#   - n: x\n#     m: y\n"
    assert example_keys(text) == {"a", "b", "b.c", "l", "l[].n", "l[].m"}


def test_the_example_config_shows_every_key() -> None:
    shown = example_keys((ROOT / "configs" / "checkpointer.yaml").read_text())
    required, allowed = model_keys()
    assert not required - shown, (
        f"configs/checkpointer.yaml says it shows every key, but lacks {sorted(required - shown)}"
    )
    assert not shown - allowed, (
        f"configs/checkpointer.yaml shows keys the config model lacks: {sorted(shown - allowed)}"
    )
