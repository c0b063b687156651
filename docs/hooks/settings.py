"""MkDocs hook: the configuration reference is generated from the package's own settings table
(``runguard_autolog._config.MEANINGS`` and the defaults ``resolve()`` gives), never written twice."""

from __future__ import annotations

MARKER = "<!-- runguard:settings -->"


def table() -> str:
    from runguard_autolog._config import reference

    lines = ["| keyword | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for row in reference():
        keyword = f"`{row['keyword']}`" if row["keyword"] else "(environment only)"
        lines.append(f"| {keyword} | `{row['variable']}` | {row['default']} | {row['meaning']} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, table()) if MARKER in markdown else markdown
