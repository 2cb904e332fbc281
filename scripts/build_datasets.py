#!/usr/bin/env python3
"""Build the small text datasets shipped in ``llmtrain/assets/data/``.

Two public-domain books, taken from Debian packages, are turned into clean,
deterministic, gzip-compressed JSON Lines files:

* The Devil's Dictionary (Ambrose Bierce, 1911), Debian package ``dict-devil``
  (a dictd database: ``devil.dict.dz`` plus its ``devil.index``).
* The Jargon File 4.4.7 (Eric S. Raymond et al., 2003), Debian package
  ``jargon-text`` (a plain-text rendering, ``jargon.txt.gz``).

Outputs (written to ``--out``, default ``llmtrain/assets/data``):

* ``entries.jsonl.gz`` -- the pretraining corpus: one document per dictionary entry of the train
  split, both books: ``{"source": "devil"|"jargon", "term": ..., "text": ...}``. The entries of the
  val and test headwords are left out, and so is any entry that contains the text of one of them (a
  few definitions are shared by two headwords), so that the stages' held-out records were never
  pretrained on (see :func:`pretraining_entries`).
* ``classify_{train,val,test}.jsonl.gz`` -- ``{"text": <definition>, "label": "devil"|"jargon"}``.
* ``instruct_{train,val,test}.jsonl.gz`` -- Alpaca records ``{"instruction", "input", "output"}``.
* ``preference_{train,val,test}.jsonl.gz`` -- DPO pairs ``{"prompt", "chosen", "rejected"}``.
* ``PROVENANCE.md`` -- sources, licences, counts, checksums and how to rebuild.

Usage::

    python scripts/build_datasets.py               # runs `apt-get download dict-devil jargon-text` in a temp dir
    python scripts/build_datasets.py --debs DIR    # uses DIR/dict-devil_*.deb and DIR/jargon-text_*.deb

The ``.deb`` files are unpacked with ``dpkg-deb -x`` into a temporary folder, so
the script needs ``dpkg-deb`` (and ``apt-get`` when ``--debs`` is not given);
otherwise it uses only the Python standard library. The same ``.deb`` files
always give byte-identical outputs (sorted input order, gzip ``mtime=0``, no
timestamps anywhere).

Splits are fixed by a stable hash of ``source + term`` (see :func:`split_of`),
so one headword lands in the same split in every dataset.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "llmtrain" / "assets" / "data"

DEVIL_PKG = "dict-devil"
JARGON_PKG = "jargon-text"
PACKAGES = (DEVIL_PKG, JARGON_PKG)

# Paths inside the unpacked packages.
DEVIL_DICT = "usr/share/dictd/devil.dict.dz"
DEVIL_INDEX = "usr/share/dictd/devil.index"
JARGON_TEXT = "usr/share/doc/jargon-text/jargon.txt.gz"
COPYRIGHT = "usr/share/doc/{pkg}/copyright"

BOOK_TITLE = {"devil": "The Devil's Dictionary", "jargon": "The Jargon File"}

SPLITS = ("train", "val", "test")
MIN_BODY_CHARS = 20  # shorter definitions ("See HUSBAND.") are left out of the labelled sets
CLASSIFY_CHARS = 600
INSTRUCT_CHARS = 400

NBSP = "\u00a0"


@dataclass(frozen=True)
class Entry:
    """One dictionary entry.

    ``head`` is the cleaned headword line ("ABASEMENT, n.", "code monkey: n."),
    ``body`` the cleaned definition that follows it, and ``text`` the whole
    entry as one document.
    """

    source: str
    term: str
    head: str
    body: str
    text: str


# --------------------------------------------------------------------------
# Text helpers shared by both books
# --------------------------------------------------------------------------

# A cross-reference is written {word}. Braces that are really part of the text
# (C code "{code;}", brace expansion "{Net,Free,Open}", "{ and }") are kept:
# a reference has no leading/trailing space, no ";" and no comma glued to the
# next word. Inside code and other preformatted text only {known headword} is
# taken for a reference. A stray space the renderer left before ";" "," "."
# ("{bang} ; pling") goes with the braces.
CROSS_REF = re.compile(r"\{(?=\S)([^{};]*?[^\s{};,])\}(?: (?=[;,]|\.(?!\.)))?")
UNDERLINE_ITALIC = re.compile(r"(?<![\w_])_([^_\n]+(?:\n[^_\n]+)*?)_(?![\w_])")
SPACES = re.compile(r"[ \t\u00a0]+")


def strip_cross_refs(text: str, headwords: frozenset[str] | None = None) -> str:
    """Turn cross-references ``{word}`` into plain ``word``.

    With ``headwords`` (lower-cased), only references to one of them are
    replaced: the safe choice inside code.
    """

    def replace(match: re.Match[str]) -> str:
        word = match.group(1)
        if headwords is not None:
            return word if word.lower() in headwords else match.group(0)
        return match.group(0) if re.search(r",\S", word) else word

    return CROSS_REF.sub(replace, text)


def collapse_spaces(line: str) -> str:
    """Collapse runs of blanks (including no-break spaces) to one space and trim."""
    return SPACES.sub(" ", line).strip()


def split_chunks(lines: Iterable[str]) -> list[list[str]]:
    """Split lines into runs separated by blank lines."""
    chunks: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def dedent_block(lines: list[str]) -> str:
    """Keep a preformatted block as is, minus its common indentation."""
    lines = [line.replace(NBSP, " ").rstrip() for line in lines]
    margin = min(indent_of(line) for line in lines if line.strip())
    return "\n".join(line[margin:] for line in lines)


# A sentence ends at ".", "!" or "?" (maybe inside closing quotes/brackets) before a blank or a line break ...
SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*(?=\s)")
# ... unless the "sentence" is a sense number ("2."), an initial ("C.") or an abbreviation ("adj.", "e.g.").
NOT_SENTENCE_END = re.compile(
    r"(?:^|\s)(?:\d+|[A-Za-z]|n|v|vt|vi|adj|adv|pl|esp|Esp|e\.g|i\.e|cf|vs|etc|excl|interj|prob|orig|abbrev|"
    r"St|Mr|Mrs|Dr|Prof|Jr|Sr)\.$"
)


def truncate(text: str, limit: int, *, sentence: bool = False, ellipsis: str = "") -> str:
    """Cut ``text`` to at most ``limit`` characters at a word boundary.

    With ``sentence=True`` a cut after a full stop, question or exclamation
    mark is preferred when one falls in the second half of the window.
    ``ellipsis`` is appended (within the limit) only when something was cut
    at a word boundary.
    """
    if len(text) <= limit:
        return text
    window = text[: limit + 1]
    if sentence:
        ends = [
            m.end()
            for m in SENTENCE_END.finditer(window)
            if m.end() <= limit and not NOT_SENTENCE_END.search(window[: m.end()])
        ]
        if ends and ends[-1] >= limit // 2:
            return text[: ends[-1]]
    window = text[: limit - len(ellipsis) + 1]
    cut = max(window.rfind(" "), window.rfind("\n"))
    if cut <= 0:
        cut = limit - len(ellipsis)
    return text[:cut].rstrip(" \n,;:-") + ellipsis


# --------------------------------------------------------------------------
# The Devil's Dictionary (dictd database)
# --------------------------------------------------------------------------

DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# "ABASEMENT, n.", "BABE or BABY, n.", "IMPOSTOR n.", "INFERIAE,n.", "ENOUGH, pro.", "WHITE, adj. and n."
DEVIL_HEAD_POS = re.compile(
    r"^(?P<term>[A-Z][A-Z0-9 .,'()?-]*?(?: or [A-Z][A-Z .'-]*)?(?: \(or [A-Z]+\)[A-Z ]*)?)"
    r",? ?(?P<pos>(?:n|v|adj|adv|pp|p|x|pro|pron)\.(?:[a-z]+\.)*(?: and [a-z]+\.)?)(?= |$)"
)
# "ABRACADABRA.", "CUI BONO?", "HABEAS CORPUS.", "LL.D.", "R.I.P." followed by two spaces or the line end.
DEVIL_HEAD_BARE = re.compile(r"^(?P<term>[A-Z][A-Z. ]*[A-Z.?])(?=  |$)")
# Right-aligned attributions under verse ("G.J.", "Jum Coople") end near column 70.
ATTRIBUTION_MIN_INDENT = 20
ATTRIBUTION_MIN_END = 66


def dictd_number(code: str) -> int:
    """Decode a dictd index offset/length (base-64 digits, most significant first)."""
    value = 0
    for char in code:
        value = value * 64 + DICTD_B64.index(char)
    return value


def devil_prose(chunk: list[str]) -> list[str]:
    """Re-join a prose run. An indented line starts a new paragraph."""
    paragraphs: list[str] = []
    for line in chunk:
        if line.startswith(" ") or not paragraphs:
            paragraphs.append(line.strip())
        elif re.search(r"[A-Za-z]-$", paragraphs[-1]) and not paragraphs[-1].endswith("--"):
            paragraphs[-1] += line.strip()  # "cannon-" + "shot": a compound word split at its hyphen
        else:
            paragraphs[-1] += " " + line.strip()
    return [collapse_spaces(p) for p in paragraphs]


def devil_verse(chunk: list[str]) -> str:
    """Keep the line breaks of an indented quotation; a right-aligned last line is its author."""
    lines = [collapse_spaces(line) for line in chunk]
    last = chunk[-1]
    if len(chunk) > 1 and indent_of(last) >= ATTRIBUTION_MIN_INDENT and len(last) >= ATTRIBUTION_MIN_END:
        lines[-1] = "-- " + lines[-1]
    return "\n".join(lines)


def clean_devil_entry(raw: str) -> str:
    """Normalise the whitespace of one raw entry; paragraphs are separated by a blank line."""
    blocks: list[str] = []
    for chunk in split_chunks(raw.split("\n")):
        if any(not line.startswith(" ") for line in chunk):
            blocks.extend(devil_prose(chunk))
        else:
            blocks.append(devil_verse(chunk))
    text = "\n\n".join(blocks)
    text = strip_cross_refs(text)
    return UNDERLINE_ITALIC.sub(r"\1", text)  # _italics_ markup of the e-text


def split_devil_head(first_line: str, text: str) -> tuple[str, str, str]:
    """Return (term, head, body) of a cleaned entry, finding the headword on its raw first line."""
    match = DEVIL_HEAD_POS.match(first_line) or DEVIL_HEAD_BARE.match(first_line)
    if not match:
        # Letters of the alphabet start with a sentence: "I is the first letter ...", "W (double U) has ..."
        letter = re.match(r"^([A-Z])\b", first_line)
        if not letter:
            raise ValueError(f"unrecognised Devil's Dictionary headword: {first_line!r}")
        return letter.group(1), "", text
    term = match.group("term").strip()
    head = collapse_spaces(match.group(0))
    if not text.startswith(head):
        raise ValueError(f"headword {head!r} not at the start of {text[:60]!r}")
    if "." not in term[:-1]:  # "ABRACADABRA." -> ABRACADABRA, but keep "LL.D.", "R.I.P."
        term = term.rstrip(".?")
    return term, head, text[len(head) :].strip()


def parse_devil(dict_path: Path, index_path: Path) -> list[Entry]:
    """Parse the dictd database of The Devil's Dictionary.

    The index lists (headword, offset, length) for every entry, several
    headwords sometimes sharing one entry. Its ``00-database-*`` records are
    the dictd metadata; one of them ("info") holds the e-text's title page and
    the preface, so dropping them keeps only the dictionary entries.
    """
    data = gzip.decompress(dict_path.read_bytes())
    spans: set[tuple[int, int]] = set()
    metadata: set[tuple[int, int]] = set()
    for row in index_path.read_text(encoding="utf-8").splitlines():
        headword, offset, length = row.split("\t")
        span = (dictd_number(offset), dictd_number(length))
        (metadata if headword.startswith("00database") else spans).add(span)
    spans -= metadata

    entries: list[Entry] = []
    position = min(spans)[0]
    for offset, length in sorted(spans):
        if offset != position:
            raise ValueError(f"devil.index: gap or overlap at byte {position}")
        position = offset + length
        raw = data[offset : offset + length].decode("utf-8")
        text = clean_devil_entry(raw)
        term, head, body = split_devil_head(raw.split("\n", 1)[0], text)
        term = term.lower() if len(term) > 1 else term
        entries.append(Entry("devil", term, head, body, text))
    return entries


# --------------------------------------------------------------------------
# The Jargon File (plain text rendering of the HTML edition)
# --------------------------------------------------------------------------

JARGON_START = "Glossary"  # the lexicon starts at this unindented line ...
JARGON_END = re.compile(r"^\s*Part\sIII\.\sAppendices\s*$|^Appendix\sA\.\s")  # ... and ends here
JARGON_HEAD = re.compile(r"^   :(?P<term>.+?):(?: +(?P<rest>.*))?$")
LETTER_HEADING = re.compile(r"^  [0-9A-Z]$")  # "  A": a letter section, followed by its list of headwords
JARGON_WIDTH = 73  # prose is filled to 73 columns after the 3-space margin; shorter lines are deliberate breaks

# A handful of rendering slips in jargon.txt, fixed by hand before parsing.
JARGON_FIXES = (
    ("banner({1,6)}", "banner(1,6)"),
    ("log_{2$(3)}", "log_2(3)"),
    ("<gnu@toad.com>}", "<gnu@toad.com>"),
    ("pronunciation}", "pronunciation"),
    ("{qux}before", "{qux} before"),
    ("{{VAX}}", "{VAX}"),
)
# "• item" or " 2. item" (the marker padded with no-break spaces), continued on lines with a hanging indent.
LIST_ITEM = re.compile(r"^(?P<indent> *)[ \u00a0]*(?P<marker>•|\d+\.)[ \u00a0]+(?=\S)")


def is_filled_prose(chunk: list[str]) -> bool:
    """True when a run of lines is ordinary filled text that can be re-joined.

    Preformatted text (code, verse, ASCII art, tables) is told apart by
    indentation made of no-break spaces (the HTML <pre> rendering uses them),
    uneven indentation, runs of spaces inside a line, or a line that ends
    early although the next word would have fitted.
    """
    if any(line.lstrip(" ").startswith(NBSP) for line in chunk):
        return False
    chunk = [line.replace(NBSP, " ") for line in chunk]
    if len({indent_of(line) for line in chunk}) > 1 or any("  " in line.strip() for line in chunk):
        return False
    for line, following in zip(chunk, chunk[1:], strict=False):
        if len(line) + 1 + len(following.split()[0]) <= JARGON_WIDTH:
            return False
    return True


def list_item(chunk: list[str]) -> str | None:
    """Re-join a bulleted or numbered list item with a hanging indent; None if ``chunk`` is not one."""
    match = LIST_ITEM.match(chunk[0])
    if not match:
        return None
    rest = chunk[1:]
    if rest and (
        len({indent_of(line) for line in rest}) > 1
        or indent_of(rest[0]) <= len(match.group("indent"))
        or any(NBSP in line or "  " in line.strip() for line in rest)
    ):
        return None
    return collapse_spaces(" ".join([match.group("marker"), chunk[0][match.end() :], *rest]))


def jargon_table(chunk: list[str]) -> str:
    """Flatten a box-drawn table into one line per row ("cell -- cell")."""
    rows: list[list[str]] = []
    current: list[str] = []
    for line in chunk:
        stripped = line.strip()
        if stripped[:1] in "┌├└":
            if current:
                rows.append(current)
            current = []
            continue
        cells = [cell.strip() for cell in stripped.strip("│").split("│")]
        if not current:
            current = [""] * len(cells)
        for i, cell in enumerate(cells):
            current[i] = f"{current[i]} {cell}".strip()
    if current:
        rows.append(current)
    lines = []
    for row in rows:
        cells = [collapse_spaces(strip_cross_refs(cell)) for cell in row if cell]
        line = cells[0]
        for cell in cells[1:]:
            line += (" " if line.endswith(":") else " -- ") + cell
        lines.append(line)
    return "\n".join(lines)


def clean_jargon_body(lines: list[str], headwords: frozenset[str]) -> str:
    """Clean the body of one lexicon entry (the lines after its headword line)."""
    blocks: list[str] = []
    for chunk in split_chunks(lines):
        if chunk[0].strip().startswith("┌"):
            blocks.append(jargon_table(chunk))
        elif is_filled_prose(chunk):
            blocks.append(strip_cross_refs(collapse_spaces(" ".join(chunk))))
        elif (item := list_item(chunk)) is not None:
            blocks.append(strip_cross_refs(item))
        else:
            blocks.append(strip_cross_refs(dedent_block(chunk), headwords))
    return "\n\n".join(blocks)


def jargon_head(term: str, rest: str) -> str:
    """Headword line without the ':' markup and the empty pronunciation '//'."""
    rest = re.sub(r"\s*(?:^//,?|,\s*//(?=,|$))\s*", "", rest.strip())  # "//, n." and "n., //" -> "n."
    return f"{term}: {rest}" if rest else term


def parse_jargon(text_path: Path) -> list[Entry]:
    """Parse the lexicon of the Jargon File.

    The lexicon runs from the ``Glossary`` line to Part III (the appendices).
    Each letter section opens with a list of its headwords (one indented line
    each), which is skipped: only lines ``   :headword: ...`` start an entry,
    and an entry runs until the next one, a letter heading or the end.
    """
    raw = gzip.decompress(text_path.read_bytes()).decode("utf-8")
    for old, new in JARGON_FIXES:
        raw = raw.replace(old, new)
    lines = raw.split("\n")
    start = lines.index(JARGON_START) + 1
    headwords = frozenset(m.group("term").lower() for line in lines[start:] if (m := JARGON_HEAD.match(line)))

    entries: list[Entry] = []
    head: re.Match[str] | None = None
    body: list[str] = []

    def flush() -> None:
        if head is not None:
            term = head.group("term")
            head_line = jargon_head(term, head.group("rest") or "")
            cleaned = clean_jargon_body(body, headwords)
            text = f"{head_line}\n\n{cleaned}" if cleaned else head_line
            entries.append(Entry("jargon", term, head_line, cleaned, text))

    for line in lines[start:]:
        if JARGON_END.match(line):
            break
        match = JARGON_HEAD.match(line)
        if match or LETTER_HEADING.match(line):
            flush()
            head, body = match, []
        elif head is not None:
            body.append(line[3:] if line.startswith("   ") else line)
    else:
        raise ValueError("jargon.txt: end of the lexicon not found")
    flush()
    return entries


# --------------------------------------------------------------------------
# Derived datasets
# --------------------------------------------------------------------------


def split_of(source: str, term: str) -> str:
    """Stable split for a headword: sha1 of ``source:term`` mod 100 -> <80 train, <90 val, else test."""
    bucket = int(hashlib.sha1(f"{source}:{term}".encode()).hexdigest(), 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def classify_records(entries: list[Entry]) -> dict[str, list[dict[str, str]]]:
    """Labelled text classification: which book is this definition from?"""
    out: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for entry in entries:
        if len(entry.body) >= MIN_BODY_CHARS:
            record = {"text": truncate(entry.body, CLASSIFY_CHARS), "label": entry.source}
            out[split_of(entry.source, entry.term)].append(record)
    return out


def instruction_of(entry: Entry) -> str:
    """The request to define a headword in the voice of its book."""
    if entry.source == "devil":
        return f'Define "{entry.term}" as The Devil\'s Dictionary would.'
    return f'What does "{entry.term}" mean in hacker jargon?'


def answer_of(entry: Entry) -> str:
    """The definition as an answer: cut to INSTRUCT_CHARS at a sentence or word boundary."""
    return truncate(entry.body, INSTRUCT_CHARS, sentence=True, ellipsis=" ...")


def instruct_records(entries: list[Entry]) -> dict[str, list[dict[str, str]]]:
    """Alpaca-style instruction records: define a headword in the voice of its book."""
    out: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for entry in entries:
        if len(entry.body) < MIN_BODY_CHARS:
            continue
        record = {"instruction": instruction_of(entry), "input": "", "output": answer_of(entry)}
        out[split_of(entry.source, entry.term)].append(record)
    return out


def preference_records(entries: list[Entry]) -> dict[str, list[dict[str, str]]]:
    """Preference pairs for DPO: the instruct set's requests, chosen = the headword's own definition, rejected =
    the definition of another headword of the same split (so val and test pairs hold val and test entries only).

    The other headword is the next one on a ring of the split's entries ordered by ``sha1("rejected:source:term")``:
    every definition is rejected exactly once, never for its own headword, and from either book, so some pairs
    differ in voice and the others only in what the definition is about.
    """
    by_split: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for entry in entries:
        if len(entry.body) >= MIN_BODY_CHARS:
            by_split[split_of(entry.source, entry.term)].append(entry)
    out: dict[str, list[dict[str, str]]] = {}
    for split, kept in by_split.items():
        ring = sorted(range(len(kept)), key=lambda i: hashlib.sha1(
            f"rejected:{kept[i].source}:{kept[i].term}".encode()).hexdigest())
        after = {i: ring[(k + 1) % len(ring)] for k, i in enumerate(ring)}
        out[split] = []
        for i, entry in enumerate(kept):
            others = [after[i]]
            while len(others) < len(ring) and answer_of(kept[others[-1]]) == answer_of(entry):
                others.append(after[others[-1]])  # two headwords with one definition: take the next
            if answer_of(kept[others[-1]]) != answer_of(entry):  # else the split has no other definition
                out[split].append({"prompt": instruction_of(entry), "chosen": answer_of(entry),
                                   "rejected": answer_of(kept[others[-1]])})
    return out


def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces: how held-out text is compared with the corpus."""
    return " ".join(text.split())


def held_out_texts(by_kind: dict[str, dict[str, list[dict[str, str]]]]) -> list[str]:
    """The val and test texts of every stage set, normalised: classify texts, instruct answers (without the
    ellipsis a cut answer ends with)."""
    texts = []
    for kind, by_split in by_kind.items():
        for split in ("val", "test"):
            for record in by_split[split]:
                text = record["text"] if kind == "classify" else record["output"].removesuffix(" ...")
                texts.append(normalise(text))
    return texts


def pretraining_entries(entries: list[Entry], held_out: list[str]) -> list[Entry]:
    """The pretraining corpus: the entries whose headword is in the train split, less those whose text contains
    a held-out stage text (a definition shared with a val or test headword). The stages' held-out records are
    then nowhere in the pretraining documents, neither in its training nor in its validation split."""
    kept = [e for e in entries if split_of(e.source, e.term) == "train"]
    return [e for e in kept if not any(text in normalise(e.text) for text in held_out)]


def write_jsonl_gz(path: Path, records: Iterable[dict[str, str]]) -> int:
    """Write records as gzip-compressed UTF-8 JSON Lines, reproducibly (mtime=0, no file name)."""
    buffer = io.BytesIO()
    count = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    path.write_bytes(buffer.getvalue())
    return count


# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    deb: Path
    sha256: str
    root: Path  # where the package was unpacked


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_deb(folder: Path, name: str) -> Path:
    found = sorted(folder.glob(f"{name}_*.deb"))
    if not found:
        sys.exit(f"error: no {name}_*.deb in {folder}")
    if len(found) > 1:
        sys.exit(f"error: several {name}_*.deb in {folder}: {[p.name for p in found]}")
    return found[0]


def fetch_packages(debs: Path | None, workdir: Path) -> list[Package]:
    """Locate (or ``apt-get download``) the two .deb files and unpack them with ``dpkg-deb -x``."""
    if debs is None:
        debs = workdir / "debs"
        debs.mkdir()
        print(f"$ apt-get download {' '.join(PACKAGES)}", flush=True)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    packages = []
    for name in PACKAGES:
        deb = find_deb(debs, name)
        root = workdir / name
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        fields = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        packages.append(Package(name, fields, deb, sha256_of(deb), root))
    return packages


def origin_lines(copyright_text: str) -> list[str]:
    """Paragraphs of a Debian copyright file that say where the upstream text came from."""
    paragraphs = (" ".join(chunk).strip() for chunk in split_chunks(copyright_text.splitlines()))
    return [" ".join(p.split()) for p in paragraphs if re.search(r"https?://|Upstream Author", p)]


# --------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------

STATUS_QUOTES = {
    DEVIL_PKG: (
        "The Devil's Dictionary is in the public domain, its copyright has expired.",
        "Copyright 1911 by Albert and Charles Boni, Inc.",
        "A Public Domain Text, Copyright Expired",
    ),
    JARGON_PKG: (
        "This document (the Jargon File) is in the public domain, to be freely used, shared, and modified.",
        "Please extend the courtesy of proper citation when you quote the File, ideally with a version number, "
        "as it will change and grow over time.",
    ),
}


def check_quotes(packages: list[Package]) -> None:
    """Make sure the licence sentences quoted in PROVENANCE.md are really in the copyright files."""
    for package in packages:
        text = " ".join((package.root / COPYRIGHT.format(pkg=package.name)).read_text(encoding="utf-8").split())
        for quote in STATUS_QUOTES[package.name]:
            if quote not in text:
                sys.exit(f"error: {package.name} copyright file no longer says: {quote!r}")


def provenance(packages: list[Package], entries: list[Entry], counts: dict[str, int], out: Path) -> str:
    """Render PROVENANCE.md."""
    by_source = {src: sum(e.source == src for e in entries) for src in BOOK_TITLE}
    lines = [
        "# Provenance of the shipped datasets",
        "",
        "Generated by `scripts/build_datasets.py` from two public-domain books packaged by Debian.",
        "Do not edit these files by hand; rebuild them instead (outputs are byte-for-byte reproducible):",
        "",
        "```",
        "python scripts/build_datasets.py              # runs `apt-get download dict-devil jargon-text` itself",
        "python scripts/build_datasets.py --debs DIR   # or: use DIR/dict-devil_*.deb and DIR/jargon-text_*.deb",
        "```",
        "",
        "## Sources",
        "",
        "| Debian package | Version | .deb | sha256 |",
        "| --- | --- | --- | --- |",
    ]
    for package in packages:
        lines.append(f"| `{package.name}` | {package.version} | `{package.deb.name}` | `{package.sha256}` |")
    for package, title, files in (
        (packages[0], "The Devil's Dictionary, Ambrose Bierce (1911)", f"`/{DEVIL_DICT}`, `/{DEVIL_INDEX}`"),
        (packages[1], "The Jargon File, version 4.4.7 (29 Dec 2003)", f"`/{JARGON_TEXT}`"),
    ):
        copyright_text = (package.root / COPYRIGHT.format(pkg=package.name)).read_text(encoding="utf-8")
        lines += [
            "",
            f"### {title}",
            "",
            f"Read from {files} in `{package.name}`.",
            "",
            f"Origin, from the package's `/usr/share/doc/{package.name}/copyright`:",
            "",
        ]
        lines += [f"> {line}" for line in origin_lines(copyright_text)]
        lines += ["", "Status, quoted from the same file:", ""]
        lines += [f"> {quote}" for quote in STATUS_QUOTES[package.name]]
    lines += [
        "",
        "The Debian packaging itself (scripts, not included here) is under the packagers' own terms.",
        "",
        "## What was kept",
        "",
        "* Devil's Dictionary: every entry of the dictd database; the dictd metadata records and the e-text's title",
        "  page and preface are dropped. `_italic_` markup and `{cross-reference}` braces are removed; right-aligned",
        "  verse attributions become `-- Name` lines.",
        "* Jargon File: the lexicon entries only (from `Glossary` to the appendices); the front matter, the per-letter",
        "  lists of headwords and the appendices are dropped. `{cross-reference}` braces are removed (literal braces",
        "  in code are kept), box-drawn tables become one line per row, preformatted blocks (code, verse, ASCII art)",
        "  keep their line breaks and spacing.",
        "* Prose is re-joined: paragraphs separated by one blank line, one space between words.",
        "",
        "## Files",
        "",
        "All `.jsonl.gz` files are gzip-compressed UTF-8 JSON Lines, one record per line.",
        'Splits are fixed by `sha1(f"{source}:{term}") mod 100`: < 80 train, 80-89 val, >= 90 test, so one',
        f"headword is in the same split in every dataset. Definitions shorter than {MIN_BODY_CHARS} characters are",
        "left out of the classify, instruct and preference sets.",
        "",
        "The pretraining corpus (`entries.jsonl.gz`) holds the train headwords only, less the entries whose text",
        "contains a val or test text of a stage set (a few definitions are shared by two headwords): what the stages",
        "hold out was never pretrained on. `tests/data/test_datasets.py` checks that no val or test text of a stage",
        "set (whitespace-normalised) occurs in a pretraining training document.",
        "",
        "| File | Records | Bytes | sha256 | Contents |",
        "| --- | --- | --- | --- | --- |",
    ]
    descriptions = {
        "entries": f"`{{source, term, text}}`: one document per train-split entry ({by_source['devil']} devil, "
        f"{by_source['jargon']} jargon), book order; `text` is the whole cleaned entry",
        "classify": f"`{{text, label}}`: definition without its headword line, cut to <= {CLASSIFY_CHARS} chars "
        "at a word boundary; label `devil` or `jargon`",
        "instruct": '`{instruction, input, output}` (Alpaca): `Define "term" as The Devil\'s Dictionary '
        'would.` / `What does "term" mean in hacker jargon?`; output is the definition cut to <= '
        f"{INSTRUCT_CHARS} chars at a sentence or word boundary",
        "preference": "`{prompt, chosen, rejected}` (DPO): the instruct requests; chosen is the headword's own "
        "definition, rejected the definition of another headword of the same split (the next one on a ring "
        'ordered by `sha1("rejected:source:term")`, so each is rejected once, from either book)',
    }
    for name, count in counts.items():
        path = out / name
        kind = name.split("_")[0].split(".")[0]
        lines.append(f"| `{name}` | {count} | {path.stat().st_size} | `{sha256_of(path)}` | {descriptions[kind]} |")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--debs", type=Path, help="folder with dict-devil_*.deb and jargon-text_*.deb (default: apt-get download them)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="build_datasets_") as tmp:
        packages = fetch_packages(args.debs.resolve() if args.debs else None, Path(tmp))
        devil_root, jargon_root = packages[0].root, packages[1].root
        check_quotes(packages)
        devil = parse_devil(devil_root / DEVIL_DICT, devil_root / DEVIL_INDEX)
        jargon = parse_jargon(jargon_root / JARGON_TEXT)
        entries = devil + jargon
        print(f"entries: {len(devil)} devil + {len(jargon)} jargon = {len(entries)}")

        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        counts: dict[str, int] = {}
        stage_sets = {"classify": classify_records(entries), "instruct": instruct_records(entries)}
        corpus = pretraining_entries(entries, held_out_texts(stage_sets))
        print(f"pretraining corpus: {len(corpus)} of {len(entries)} entries (train headwords, no held-out text)")
        records = ({"source": e.source, "term": e.term, "text": e.text} for e in corpus)
        counts["entries.jsonl.gz"] = write_jsonl_gz(out / "entries.jsonl.gz", records)
        # the preference pairs' texts are the instruct answers of the same split: held out with them
        for kind, by_split in {**stage_sets, "preference": preference_records(entries)}.items():
            for split in SPLITS:
                counts[f"{kind}_{split}.jsonl.gz"] = write_jsonl_gz(out / f"{kind}_{split}.jsonl.gz", by_split[split])

        (out / "PROVENANCE.md").write_text(provenance(packages, corpus, counts, out), encoding="utf-8")

    total = 0
    for name, count in counts.items():
        size = (out / name).stat().st_size
        total += size
        print(f"{name:28s} {count:6d} records {size:9d} bytes")
    print(f"{'total':28s} {'':14s} {total:9d} bytes (+ PROVENANCE.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
