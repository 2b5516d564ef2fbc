"""The bundled model's card (``Resources/Models/MODEL_CARD.md``) and the summary every front end shows."""

from __future__ import annotations

import html
import re

from .locations import model_card_path

BOLD = re.compile(r"\*\*(.+?)\*\*")
CODE = re.compile(r"`([^`]+)`")


def model_card_text() -> str:
    card = model_card_path()
    return card.read_text(encoding="utf-8") if card.is_file() else ""


def model_card_summary(card: str) -> tuple[str, str]:
    """The card's first paragraph and its limitations section (the parts every front end shows), as Markdown."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in card.splitlines():
        if line.startswith("#"):
            sections.append((line.lstrip("#").strip(), []))
        else:
            sections[-1][1].append(line)
    paragraphs = [p.strip() for title, lines in sections if not title.lower().startswith("limit")
                  for p in "\n".join(lines).split("\n\n") if p.strip()]
    limits = [("\n".join(lines)).strip() for title, lines in sections if title.lower().startswith("limit")]
    return (paragraphs[0] if paragraphs else ""), "\n".join(text for text in limits if text)


def model_card_summary_html(card: str) -> str:
    """The card's summary as HTML (Slicer's help text): escaped, with the card's bold and code spans kept."""
    summary, limits = model_card_summary(card)
    parts = [f"<p>{_html_lines(summary)}</p>"] if summary else []
    parts += [f"<p><b>Limitations:</b><br>{_html_lines(limits)}</p>"] if limits else []
    return "\n".join(parts)


def _html_lines(text: str) -> str:
    return "<br>".join(_inline_markdown(html.escape(line.strip())) for line in text.strip().splitlines())


def _inline_markdown(escaped: str) -> str:
    return CODE.sub(r"<code>\1</code>", BOLD.sub(r"<b>\1</b>", escaped))
