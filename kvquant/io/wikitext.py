"""MediaWiki XML dump → plain prose (the offline ``enwiki-excerpt`` corpus). Pure text processing."""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

_DROP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "references and notes",
    "works cited", "literature",
}
_DROP_LINK_NS = {"file", "image", "category", "media"}
_TAGS_WITH_CONTENT = "ref|math|gallery|timeline|imagemap|score|hiero|chem|syntaxhighlight|source|templatedata|graph"

_RE_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_RE_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_RE_TAG_CONTENT = re.compile(rf"<({_TAGS_WITH_CONTENT})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_RE_TAG_BR = re.compile(r"<br\s*/?\s*>", re.I)
_RE_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_RE_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{).)*?\}\}", re.S)  # innermost template
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost table
_RE_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*?)\]\]", re.S)  # innermost internal link (may hold [x])
_RE_EXTLINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_RE_QUOTES = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_RE_LIST = re.compile(r"^[*#:;]+\s*")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_RE_SPACE_PUNCT = re.compile(r" +([.,;:!?)\]])")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_RE_INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")


def _remove_nested(pattern: re.Pattern[str], s: str, repl: Any = "") -> str:
    """Replace innermost matches repeatedly until none remain (handles nesting)."""
    while True:
        s, n = pattern.subn(repl, s)
        if n == 0:
            return s


def _template_text(m: re.Match[str]) -> str:
    """Inline templates that carry prose keep their text; every other template is dropped.

    ``{{convert|7.9|mm|...}}`` -> ``7.9 mm``, ``{{lang|grc|ἀναρχία}}`` -> ``ἀναρχία``,
    ``{{nowrap|x}}`` -> ``x``.
    """
    name, _, rest = m.group(0)[2:-2].partition("|")
    name = name.strip().lower().replace("_", " ")
    args = [a.strip() for a in rest.split("|") if "=" not in a] if rest else []
    if name in ("convert", "cvt") and len(args) >= 2:
        return f"{args[0]} {args[1]}"
    if name == "lang" and len(args) >= 2:
        return args[1]
    if name in ("nowrap", "nobr", "small", "sic", "visible anchor") and args:
        return args[0]
    return ""


def _link_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    target, sep, label = inner.partition("|")
    target = target.strip()
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _DROP_LINK_NS:  # [[File:..]], [[Image:..]], [[Category:..]]
        return ""
    if sep:
        label = label.rsplit("|", 1)[-1].strip()
        if label:
            return label
        # pipe trick: [[Foo (bar)|]] -> Foo
        return re.sub(r"\s*\(.*\)$", "", target.split(":", 1)[-1])
    if _RE_INTERWIKI.match(target):  # interlanguage link, [[de:Anarchismus]]
        return ""
    return target.lstrip(":")


def _drop_sections(lines: list[str]) -> list[str]:
    """Remove reference-like sections (See also, References, ...) and their subsections."""
    out: list[str] = []
    skip_level = 0  # heading level being skipped, 0 = not skipping
    for line in lines:
        m = _RE_HEADING.match(line)
        if m:
            level = len(m.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = 0
            if m.group(2).strip().lower() in _DROP_SECTIONS:
                skip_level = level
                continue
        elif skip_level:
            continue
        out.append(line)
    return out


def clean_wikitext(s: str) -> str:
    """Turn MediaWiki markup into plain prose (pure function).

    Drops comments, ``<ref>`` (and ``<math>``, ``<gallery>``...) with their content, other tags,
    templates ``{{...}}`` (nested), tables ``{|...|}``, ``[[File:/Image:/Category:]]`` links,
    interlanguage links, bold/italic quotes, list markers and reference sections (See also,
    References, External links...). ``[[a|b]]`` -> ``b``, ``[[a]]`` -> ``a``, ``[url label]`` ->
    ``label``, ``== X ==`` -> ``X`` on its own line. HTML entities are decoded, runs of spaces
    collapsed, blank lines removed: paragraphs are separated by one ``\\n``.
    """
    s = _RE_COMMENT.sub("", s)
    s = _RE_REF_SELF.sub("", s)
    s = _RE_TAG_CONTENT.sub("", s)
    s = _RE_TAG_BR.sub(" ", s)
    # links before templates, so a "|" inside [[a|b]] cannot split a template's arguments;
    # innermost first, so [[File:x|a [[b]] c]] goes whole
    s = _remove_nested(_RE_LINK, s, _link_text)
    s = _remove_nested(_RE_TEMPLATE, s, _template_text)
    s = _remove_nested(_RE_TABLE, s)
    s = s.replace("{{", "").replace("}}", "")
    s = _RE_TAG.sub("", s)
    s = _RE_EXTLINK.sub(lambda m: m.group(1), s)
    s = _RE_QUOTES.sub("", s)
    s = _RE_MAGIC.sub("", s)
    s = html.unescape(s)

    lines = _drop_sections(s.split("\n"))
    out = []
    for line in lines:
        m = _RE_HEADING.match(line)
        if m:
            line = m.group(2)
        else:
            line = _RE_LIST.sub("", line)
            if line.startswith("----"):
                continue
            if line.startswith(("|", "!")):  # stray table rows
                continue
        line = _RE_SPACES.sub(" ", line)
        line = _RE_EMPTY_PARENS.sub("", line)
        line = _RE_SPACE_PUNCT.sub(r"\1", line)
        line = _RE_SPACES.sub(" ", line).strip()
        if line:
            out.append(line)
    return "\n".join(out)


def _iter_pages(xml_bz2: Path) -> Iterator[tuple[str, int, bool, str]]:
    """Yield ``(title, namespace, is_redirect, wikitext)`` for each ``<page>`` of a bz2 dump."""
    with bz2.open(xml_bz2, "rb") as f:
        title, ns, redirect, text = "", 0, False, ""
        for _event, elem in ET.iterparse(f, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = int(elem.text or 0)
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                yield title, ns, redirect, text
                title, ns, redirect, text = "", 0, False, ""
                elem.clear()


def wikidump_to_text(xml_bz2: Path, min_chars: int = 1000) -> tuple[str, int]:
    """Clean every article of a MediaWiki bz2 dump; return (text, number of articles).

    Keeps main-namespace pages that are not redirects or disambiguation pages and have at least
    ``min_chars`` characters after cleaning; each article is its title on the first line followed
    by its prose, articles joined with ``"\\n\\n"``.
    """
    articles = []
    for title, ns, redirect, text in _iter_pages(xml_bz2):
        if ns != 0 or redirect or text.lstrip().upper().startswith("#REDIRECT"):
            continue
        if "(disambiguation)" in title or re.search(r"\{\{\s*(disambig|dab|hndis|geodis)", text, re.I):
            continue
        body = clean_wikitext(text)
        if len(body) < min_chars:
            continue
        articles.append(f"{title}\n{body}")
    return "\n\n".join(articles), len(articles)
