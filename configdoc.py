"""Text generated from the config schema: the README's key tables and pyproject's mirror.

Both live between marker lines in the checked-in files and are rewritten by
``pollinate config --write`` (tests/test_configdoc.py fails when they are stale, with that
command in its message):

- README.md: ``<!-- config-table:start -->`` ... ``<!-- config-table:end -->``, every key
  (default, allowed values, meaning), then every registered name with its options.
- pyproject.toml: ``# <config-mirror:start>`` ... ``# <config-mirror:end>``, Flower's
  ``[tool.flwr.app.config.*]`` defaults (``flwr run .`` reads them there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.config import RunConfig, schema, toml_tables, toml_value
from pollinate.registry import Registry
from pollinate.schema import Key

__all__ = ["GENERATED", "Generated", "key_table", "pyproject_mirror", "stale", "write"]

ROOT = Path(__file__).resolve().parent
FIX = "pollinate config --write"


@dataclass(frozen=True)
class Generated:
    """A generated block of a checked-in file, between two marker lines."""

    path: str  # relative to the repository root
    start: str
    end: str

    def current(self, root: Path = ROOT) -> str:
        """The block as the file has it now (the text between the markers)."""
        text = (root / self.path).read_text(encoding="utf-8")
        if self.start not in text or self.end not in text:
            raise ValueError(f"{self.path} lacks the marker lines {self.start!r} / {self.end!r}")
        return text.split(self.start, 1)[1].split(self.end, 1)[0]

    def replaced(self, body: str, root: Path = ROOT) -> str:
        """The whole file with ``body`` between the markers."""
        text = (root / self.path).read_text(encoding="utf-8")
        head, rest = text.split(self.start, 1)
        return head + self.start + body + self.end + rest.split(self.end, 1)[1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _allowed(key: Key) -> str:
    if key.range is not None:
        return key.range.span(integer=isinstance(key.default, int))
    if key.choices:
        return " \\| ".join(f"`{c}`" for c in key.choices)
    if isinstance(key.default, bool):
        return "`true` \\| `false`"
    return "text"


def key_table() -> str:
    """The README's tables: every key, then every registered name and its options."""
    keys = schema()
    rows = [
        "| key | default | allowed | what it sets |",
        "| --- | --- | --- | --- |",
    ]
    for key in keys.values():
        who = f"({', '.join(f'`{u}`' for u in key.used_by)}) " if key.option else ""
        rows.append(
            f"| `{key.name}` | `{_cell(toml_value(key.default))}` | {_allowed(key)} | "
            f"{who}{_cell(key.help)} |"
        )
    rows += ["", "| key | value | what it is | its options |", "| --- | --- | --- | --- |"]
    for registry in _registries():
        for entry in registry.entries():
            section = registry.key.split(".", 1)[0]
            options = ", ".join(f"`{section}.{k}`" for k in entry.options) or "none"
            uses = getattr(entry, "uses", ())
            if uses:
                options += "; reads " + ", ".join(f"`{section}.{k}`" for k in uses)
            rows.append(f"| `{registry.key}` | `{entry.name}` | {_cell(entry.help)} | {options} |")
    return "\n" + "\n".join(rows) + "\n"


def _registries() -> list[Registry[Any]]:
    """The registries behind the config's name keys, in key order."""
    from pollinate.config import MODEL_REGISTRY, PERSONALIZATION_REGISTRY, STRATEGY_REGISTRY
    from pollinate.data import DATASETS, PARTITIONERS

    found: list[Registry[Any] | None] = [
        DATASETS,
        PARTITIONERS,
        MODEL_REGISTRY.get(load=True),
        STRATEGY_REGISTRY.get(load=True),
        PERSONALIZATION_REGISTRY.get(load=True),
    ]
    return [r for r in found if r is not None]


def pyproject_mirror() -> str:
    """``[tool.flwr.app.config.<section>]`` tables of every default."""
    return "\n" + toml_tables(RunConfig().to_flat(), prefix="tool.flwr.app.config.")


README = Generated("README.md", "<!-- config-table:start -->", "<!-- config-table:end -->")
PYPROJECT = Generated("pyproject.toml", "# <config-mirror:start>", "# <config-mirror:end>")
GENERATED = ((README, key_table), (PYPROJECT, pyproject_mirror))


def stale(root: Path = ROOT) -> list[str]:
    """The generated files whose block differs from what the schema gives now."""
    return [g.path for g, make in GENERATED if g.current(root) != make()]


def write(root: Path = ROOT) -> list[str]:
    """Rewrite every stale block (written then renamed); the files changed."""
    changed = []
    for g, make in GENERATED:
        if g.current(root) != make():
            target = root / g.path
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(g.replaced(make(), root), encoding="utf-8")
            tmp.replace(target)
            changed.append(g.path)
    return changed


def command(*, output: str = "markdown", write_files: bool = False, check: bool = False) -> int:
    """``pollinate config``: print the key table (or the defaults as TOML), or refresh /
    check the generated blocks. Returns the exit code (1: ``--check`` found stale ones)."""
    if write_files:
        changed = write()
        print(f"rewrote {', '.join(changed)}" if changed else "up to date")
        return 0
    if check:
        old = stale()
        if old:
            print(f"stale: {', '.join(old)}; run `{FIX}`")
            return 1
        print("up to date")
        return 0
    print(key_table().strip() if output == "markdown" else toml_tables(RunConfig().to_flat()))
    return 0
