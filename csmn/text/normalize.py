"""Text normalization and tokenization of captions and hashtags (paper 3.2, the authors' code).

Captions: URLs removed; emoji kept, each emoji one token (a ZWJ sequence, a skin-tone
modifier, a flag or a keycap stays ONE token); other non-ASCII removed after folding accents
(``café`` -> ``cafe``; non-Latin scripts vanish); special characters removed; lowercased;
``#`` and ``@`` get a space before them; user names become the token ``@username``; hashtags
keep their ``#``. Hashtag lists: each tag normalized the same way to one ``#tag`` token,
duplicates dropped (order kept).

The English test of 3.1 looks at the *raw* caption instead (normalization would already have
deleted the non-English script it must see): :func:`language_words` lists the words it counts.
Everything here is a pure function; the dictionary lookups live in :mod:`csmn.filters`.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from functools import lru_cache

USERNAME_TOKEN = "@username"

# Emoji by code point ranges (no dependency on an emoji package): the pictographic blocks,
# plus the symbols in older blocks that have an emoji presentation. (c), (R) and TM are left
# out on purpose: in captions they are text ("(c) 2016 me"), not emoji.
_EMOJI_BASE = (
    "\u203c\u2049\u2139\u2194-\u2199\u21a9\u21aa\u231a\u231b\u2328\u23cf\u23e9-\u23f3"
    "\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe\u2600-\u27bf\u2934\u2935"
    "\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55\u3030\u303d\u3297\u3299"
    "\U0001f000-\U0001faff"
)
_VARIATION = "\ufe0e\ufe0f"
_SKIN_TONE = "\U0001f3fb-\U0001f3ff"
_TAG_CHARS = "\U000e0020-\U000e007f"  # subdivision flags (England, Scotland, Wales)
_ELEMENT = f"[{_EMOJI_BASE}][{_VARIATION}]?[{_SKIN_TONE}]?[{_VARIATION}]?[{_TAG_CHARS}]*"
_FLAG = "[\U0001f1e6-\U0001f1ff]{2}"
_KEYCAP = "[#*0-9]\ufe0f?\u20e3"
EMOJI_PATTERN = re.compile(f"{_FLAG}|{_KEYCAP}|{_ELEMENT}(?:\u200d{_ELEMENT})*")

_TLDS = (
    "com|net|org|io|co|us|uk|ly|me|gl|info|biz|edu|gov|tv|be|it|de|fr|ca|au|shop|store|"
    "online|site|link"
)
# A URL: a scheme or www. link up to the next space, or a bare domain (labels of [a-z0-9-]
# joined by dots, from a word boundary to its last ".<tld>" at a word boundary, then an
# optional /path). Alone, the bare-domain branch takes quadratic time (18 s on "a." * 8000):
# each start inside a long dotted run backtracks over the rest of the run and fails. A start
# inside a run that failed reaches the same end with fewer TLDs, so it fails too; the third
# branch (group "skip") therefore consumes such a run whole, possessively, stopping only
# where a link begins (a link needs no word boundary, so one can start inside a run).
# Not links: "www." inside a word ("awwww... my puppy"), and a full stop with no space after
# it before a capitalized word that spells a TLD ("fun day.It was", "so happy.Co-workers");
# an all-capitals domain (EXAMPLE.COM) still is one.
URL_PATTERN = re.compile(
    r"(?P<url>(?:(?:https?|ftp)://|(?<![a-z0-9])www\.)\S+"
    rf"|\b[a-z0-9][a-z0-9\-]*(?:\.[a-z0-9\-]+)*\.(?!(?-i:[A-Z][a-z]))(?:{_TLDS})\b"
    r"(?:/\S*)?)"
    r"|(?P<skip>\b[a-z0-9](?:(?!(?:https?|ftp)://|www\.)(?:[a-z0-9\-]|\.(?=[a-z0-9\-])))*+)",
    re.IGNORECASE,
)
_MENTION = re.compile(r"@[a-z0-9._]+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
# What survives in normalized text besides emoji: ASCII letters, digits, and the characters
# that can belong to a token (# and @ as prefixes; ' - _ inside words).
_NOT_KEPT = re.compile(r"[^a-z0-9#@'\-_\s]+")
_EDGE_PUNCT = "'-_"
_DIGIT = re.compile(r"\d")
# Characters that split a raw word for the English test (anything but letters of any script,
# digits, apostrophes and hyphens).
_WORD_SPLIT = re.compile(r"[^\w'\-]+|_+")


@functools.cache
def _word_split_any_script() -> re.Pattern[str]:
    """:data:`_WORD_SPLIT` that keeps combining marks inside their word. ``\\w`` has none, so
    the vowel signs and viramas of Indic scripts split one word into pieces (नमस्ते into
    नमस and त), and a dictionary may take such a lone letter for English. Built on first
    use: ``re`` has no Unicode category classes, so the marks' ranges are listed."""
    ranges: list[str] = []
    start = previous = None
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)).startswith("M"):
            if start is None:
                start = code
            previous = code
        elif start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(previous))}")
            start = None
    return re.compile(rf"[^\w'\-{''.join(ranges)}]+|_+")


# Every URL holds one of these; most captions and hashtags hold none, and then the scan
# above (whose "skip" branch matches nearly every word) need not run.
_URL_HINT = re.compile(rf"://|www\.|\.(?:{_TLDS})\b", re.IGNORECASE)


def find_urls(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each URL in ``text``, left to right; linear time."""
    if _URL_HINT.search(text) is None:
        return
    for match in URL_PATTERN.finditer(text):
        if match.lastgroup == "url":
            yield match.span()


def _replace_url(match: re.Match[str]) -> str:
    return " " if match.lastgroup == "url" else match.group(0)


def remove_urls(text: str) -> str:
    """``text`` with each URL replaced by a space."""
    if _URL_HINT.search(text) is None:
        return text
    return URL_PATTERN.sub(_replace_url, text)


def has_url(text: str) -> bool:
    """True when the text embeds a hyperlink (the paper's advertisement rule)."""
    return next(find_urls(text or ""), None) is not None


def canonical_emoji(emoji: str) -> str:
    """An emoji as one token: a lone presentation selector only picks emoji or text style, so
    it is dropped (❤ and ❤️ are one token); inside sequences (ZWJ, keycaps) it stays."""
    if len(emoji) == 2 and emoji[1] in _VARIATION:
        return emoji[0]
    return emoji


def is_emoji(token: str) -> bool:
    return bool(token) and EMOJI_PATTERN.fullmatch(token) is not None


def _fold_accents(text: str) -> str:
    if text.isascii():
        return text  # NFKD leaves ASCII alone: skip the per-character pass
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _clean_token(token: str) -> str | None:
    """One whitespace-separated piece of lowercased ASCII text -> a token, or None to drop it."""
    if token == USERNAME_TOKEN:
        return token
    if token.startswith("#"):
        body = token.lstrip("#").strip(_EDGE_PUNCT).replace("#", "").replace("@", "")
        return "#" + body if body else None
    token = token.replace("#", "").replace("@", "").strip(_EDGE_PUNCT)
    return token or None


def _normalize_plain(text: str) -> list[str]:
    """Normalize a stretch of text that holds no emoji and no URL."""
    text = _fold_accents(text.translate(_APOSTROPHES))
    text = text.replace("#", " #").replace("@", " @").lower()
    text = _MENTION.sub(f" {USERNAME_TOKEN} ", text)
    text = _NOT_KEPT.sub(" ", text)
    tokens = []
    for piece in text.split():
        if piece.isalnum():  # most words: nothing for _clean_token to change
            tokens.append(piece)
            continue
        token = _clean_token(piece)
        if token is not None:
            tokens.append(token)
    return tokens


def tokenize(text: str | None) -> list[str]:
    """Normalized tokens of a caption (see the module docstring)."""
    if not text:
        return []
    text = remove_urls(text)
    tokens: list[str] = []
    position = 0
    for match in EMOJI_PATTERN.finditer(text):
        tokens.extend(_normalize_plain(text[position : match.start()]))
        tokens.append(canonical_emoji(match.group(0)))
        position = match.end()
    tokens.extend(_normalize_plain(text[position:]))
    return tokens


def normalize_caption(text: str | None) -> list[str]:
    """Tokens of a caption for the post task (same as :func:`tokenize`)."""
    return tokenize(text)


@lru_cache(maxsize=1 << 16)
def normalize_hashtag(tag: str | None) -> str | None:
    """One raw hashtag (with or without ``#``) -> ``#tag``, or None when nothing is left.

    Only the first hashtag token is kept: a raw tag that normalizes to more than one piece
    ("summer vibes", "love😍") keeps its leading word.
    """
    if not tag:
        return None
    for token in tokenize("#" + tag.strip().lstrip("#")):
        if token.startswith("#"):
            return token
        return None
    return None


def normalize_hashtags(tags: Iterable[str] | None) -> list[str]:
    """Tokens of a hashtag list for the hashtag task: ``#tag`` each, duplicates dropped."""
    # dict.fromkeys keeps the first of each token in order, as a seen-set loop would, in C.
    tokens = dict.fromkeys(map(normalize_hashtag, tags or ()))
    tokens.pop(None, None)
    return list(tokens)


def language_words(text: str | None) -> list[str]:
    """The words of a raw caption that the English test counts.

    Not counted: URLs (ads are a separate rule), emoji, hashtags, @mentions, and anything with
    a digit (numbers, "10am", "2nd"). Letters of every script are kept so that non-English
    text is seen; punctuation splits words, apostrophes and inner hyphens do not.
    """
    if not text:
        return []
    text = remove_urls(text)
    text = EMOJI_PATTERN.sub(" ", text).translate(_APOSTROPHES)
    # NFKC maps compatibility forms (fullwidth letters, ligatures) to the letters a
    # dictionary knows, without touching real non-Latin scripts.
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("#", " #").replace("@", " @")
    words = []
    for piece in text.split():
        if piece.startswith(("#", "@")):
            continue
        if piece.isalpha():  # most words: letters only, nothing to split, strip or test
            words.append(piece)
            continue
        for part in (_WORD_SPLIT if piece.isascii() else _word_split_any_script()).split(piece):
            word = part.strip(_EDGE_PUNCT)
            if word and not _DIGIT.search(word):
                words.append(word)
    return words
