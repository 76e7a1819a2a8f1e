"""PDF ingestion for research papers: extract, clean, segment, filter.

extract   pypdf text per page. Encrypted (unless an empty password opens it), truncated, corrupt and
          zero-page files are skipped with the reason, never a crash.
clean     ligatures (ﬁ -> fi ...), running headers and footers (a line repeated at the top or
          bottom of at least half the pages, digits ignored), page numbers ("3", "Page 3 of 9",
          "- 3 -"), words hyphenated across line breaks ("experi-\\nment" -> "experiment"), and
          whitespace.
segment   paragraphs (ended by a blank line, or by a short line that ends a sentence: the last
          line of a typeset paragraph), under the current section heading ("2 Methods",
          "Introduction"). A paragraph whose last line happens to be full runs into the next.
filter    character length (default 50-800), word count (default 10-150), optional ASCII-only.
The split is made per PDF (a PDF is one document), before segmentation; segments are joined by
blank lines in the document text.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
             "\ufb05": "st", "\ufb06": "st"}
PAGE_NUMBER = re.compile(r"^\s*(?:page\s+)?[-–—]?\s*\d{1,4}\s*[-–—]?(?:\s*(?:of|/)\s*\d{1,4})?\s*$", re.I)
NUMBERED_HEADING = re.compile(r"^\d+(?:\.\d+)*\.?\s+[A-Z][A-Za-z0-9 ,:&'()-]{1,60}$")
SECTION_NAMES = {"abstract", "introduction", "background", "related work", "method", "methods",
                 "methodology", "experiments", "results", "discussion", "conclusion", "conclusions",
                 "references", "acknowledgments", "acknowledgements", "appendix", "limitations"}
SMALL_WORDS = {"a", "an", "and", "as", "at", "by", "for", "in", "of", "on", "or", "the", "to", "with"}


def is_heading(line: str) -> bool:
    """Numbered ("2.1 Routing"), a usual section name, or a short Title Case line."""
    s = line.strip()
    if not s or s.endswith((".", ",", ";")) or len(s.split()) > 8:
        return False
    if NUMBERED_HEADING.match(s) or s.lower().rstrip(":") in SECTION_NAMES:
        return True
    words = s.split()
    return len(words) <= 5 and all(w[0].isupper() or w.lower() in SMALL_WORDS for w in words) \
        and words[0][0].isupper() and any(c.isalpha() for c in s)


@dataclass
class PdfFilters:
    min_chars: int = 50
    max_chars: int = 800
    min_words: int = 10
    max_words: int = 150
    ascii_only: bool = False

    def keep(self, text: str) -> bool:
        n_words = len(text.split())
        return (self.min_chars <= len(text) <= self.max_chars and self.min_words <= n_words <= self.max_words
                and (not self.ascii_only or text.isascii()))


def extract_pages(path: Path) -> tuple[list[str] | None, str]:
    """(page texts, "") or (None, reason)."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:  # pragma: no cover - pypdf is a dependency
        return None, "pypdf is not installed"
    # pypdf logs what it recovers from (or fails on) as warnings; each PDF's fate is already in
    # the manifest ("skipped" with its reason), and a corpus of damaged PDFs flooded stderr.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            return None, "encrypted"
        pages = [p.extract_text() or "" for p in reader.pages]
    except (PdfReadError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"unreadable PDF: {type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"
    except Exception as exc:  # pypdf raises many types on damaged files; skip, never crash
        return None, f"unreadable PDF: {type(exc).__name__}"
    if not pages:
        return None, "no pages"
    return pages, ""


def _norm(line: str) -> str:
    return re.sub(r"\d+", "#", line.strip().lower())


def clean_pages(pages: list[str]) -> list[str]:
    """Cleaned lines of the whole document (page boundaries removed)."""
    pages = [unicodedata.normalize("NFKC", "".join(LIGATURES.get(c, c) for c in p)) for p in pages]
    split = [[ln.rstrip() for ln in p.splitlines()] for p in pages]
    edges = Counter()
    for lines in split:
        content = [ln for ln in lines if ln.strip()]
        for ln in set(map(_norm, content[:2] + content[-2:])):
            edges[ln] += 1
    running = {ln for ln, c in edges.items() if len(split) >= 2 and c >= max(2, len(split) / 2)}
    out: list[str] = []
    for lines in split:
        content = [ln for ln in lines if not PAGE_NUMBER.match(ln)]
        n = len(content)
        for i, ln in enumerate(content):
            at_edge = i < 2 or i >= n - 2
            if at_edge and ln.strip() and _norm(ln) in running:
                continue
            out.append(ln)
    return out


def segment(lines: list[str]) -> list[tuple[str, str]]:
    """(section, paragraph) pairs. Hyphenated line breaks are joined, other breaks become spaces."""
    paragraphs: list[tuple[str, str]] = []
    section, buf = "", ""
    widths = sorted(len(ln.strip()) for ln in lines if ln.strip())
    full = widths[int(0.9 * (len(widths) - 1))] if widths else 0  # a typical full line

    def flush():
        nonlocal buf
        text = re.sub(r"\s+", " ", buf).strip()
        if text:
            paragraphs.append((section, text))
        buf = ""

    for ln in lines:
        s = ln.strip()
        if not s:
            flush()
            continue
        if is_heading(s) and not buf.endswith("-"):
            flush()
            section = s
            continue
        if buf.endswith("-") and len(buf) > 1 and buf[-2].isalpha() and s[:1].islower():
            buf = buf[:-1] + s  # de-hyphenate across the line break
        else:
            buf = f"{buf} {s}" if buf else s
        if s.endswith((".", "!", "?", ":")) and len(s) < 0.8 * full:
            flush()  # a short line ending a sentence closes its paragraph
    return paragraphs


def pdf_document(path: Path, filters: PdfFilters | None = None) -> tuple[str | None, str]:
    """The cleaned, segmented, filtered text of one PDF as a document, or (None, reason)."""
    pages, reason = extract_pages(path)
    if pages is None:
        return None, reason
    kept = [p for _, p in segment(clean_pages(pages)) if (filters or PdfFilters()).keep(p)]
    if not kept:
        return None, "no text segment passed the filters" if any(p.strip() for p in pages) else "no text"
    return "\n\n".join(kept), ""
