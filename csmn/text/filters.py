"""The filters of paper 3.1 as pure functions, and the per-user filter that chains them.

Every post that a filter drops is counted under the FIRST rule that drops it, in this order:

1. ``non_english``: more than 20% of the caption's words are not in PyEnchant's ``en_US``
   dictionary (hashtags, @mentions, emoji and numbers are not words for this test);
2. ``advertisement``: the caption embeds a hyperlink;
3. ``bad_user``: the user has more than max(15, 0.15 x #posts) posts dropped by 1-2, so all
   of the user's posts go;

then, separately for each task (the caption and the hashtag datasets differ from here on):

4. ``too_short`` / ``too_long``: fewer than 3 or more than 15 tokens;
5. ``over_user_cap``: the user's posts beyond 1,000, keeping the most recent ones;
6. ``too_few_user_posts``: the user has fewer than 50 posts left, so all of them go.

Length comes before the per-user limits so that the 50 and 1,000 count the posts the dataset
actually holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from csmn.data.layout import TASKS
from csmn.text.normalize import has_url, language_words

KEPT = "kept"
NON_ENGLISH = "non_english"
ADVERTISEMENT = "advertisement"
BAD_USER = "bad_user"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
OVER_USER_CAP = "over_user_cap"
TOO_FEW_USER_POSTS = "too_few_user_posts"
COMMON_RULES = (NON_ENGLISH, ADVERTISEMENT, BAD_USER)
TASK_RULES = (TOO_SHORT, TOO_LONG, OVER_USER_CAP, TOO_FEW_USER_POSTS)


@dataclasses.dataclass(frozen=True)
class FilterThresholds:
    """The paper's thresholds (3.1)."""

    max_non_english_fraction: float = 0.2
    max_flagged_posts_min: int = 15
    max_flagged_posts_fraction: float = 0.15
    min_tokens: int = 3
    max_tokens: int = 15
    max_posts_per_user: int = 1000
    min_posts_per_user: int = 50


class DictionaryUnavailable(RuntimeError):
    """PyEnchant or its en_US dictionary is missing on this machine."""


@lru_cache(maxsize=4)
def english_dictionary(tag: str = "en_US") -> Any:
    """One PyEnchant dictionary per process (creating one per batch is slow)."""
    try:
        import enchant

        return enchant.Dict(tag)
    except Exception as err:  # ImportError for the C library, DictNotFoundError for en_US
        raise DictionaryUnavailable(
            f"PyEnchant dictionary {tag!r} unavailable ({err}); install libenchant-2-2 and "
            "hunspell-en-us (`make system-packages`)"
        ) from err


@lru_cache(maxsize=1 << 18)
def is_english_word(word: str) -> bool:
    """In en_US as written, lowercased or capitalized ("Paris", "LOVE"); hyphenated words
    pass when every part does."""
    dictionary = english_dictionary()
    for form in (word, word.lower(), word.capitalize()):
        if dictionary.check(form):
            return True
    parts = [p for p in word.split("-") if p]
    if len(parts) > 1:
        return all(is_english_word(p) for p in parts)
    return False


def non_english_fraction(caption: str | None) -> float:
    """Share of the caption's words not in en_US; 0.0 when it has no words to test."""
    words = language_words(caption)
    if not words:
        return 0.0
    # Counted in C (booleans are 0 and 1), not by a generator step per word.
    return (len(words) - sum(map(is_english_word, words))) / len(words)


def is_non_english(caption: str | None, max_fraction: float = 0.2) -> bool:
    return non_english_fraction(caption) > max_fraction


def is_advertisement(caption: str | None) -> bool:
    return has_url(caption or "")


def flagged_posts_limit(n_posts: int, minimum: int = 15, fraction: float = 0.15) -> float:
    return max(float(minimum), fraction * n_posts)


def is_bad_user(n_flagged: int, n_posts: int, minimum: int = 15, fraction: float = 0.15) -> bool:
    """True when a user has more than max(15, 0.15 x #posts) non-English or ad posts."""
    return n_flagged > flagged_posts_limit(n_posts, minimum, fraction)


def length_rule(n_tokens: int, min_tokens: int = 3, max_tokens: int = 15) -> str | None:
    if n_tokens < min_tokens:
        return TOO_SHORT
    if n_tokens > max_tokens:
        return TOO_LONG
    return None


def recency_key(post: dict[str, Any]) -> tuple:
    """Most recent first; posts without a time after those with one; ties by post id."""
    created: datetime | None = post.get("created_at")
    if created is None:
        return (1, 0.0, post["post_id"])
    return (0, -created.timestamp(), post["post_id"])


def filter_user_posts(
    posts: Sequence[dict[str, Any]], thresholds: FilterThresholds = FilterThresholds()
) -> list[dict[str, str]]:
    """Status per task of each of one user's posts: ``kept`` or the rule that dropped it.

    Each post needs ``post_id``, ``created_at``, ``non_english``, ``advertisement`` (booleans
    from :func:`is_non_english` and :func:`is_advertisement`) and ``post_tokens`` /
    ``hashtag_tokens``. Returns ``[{"post": status, "hashtag": status}, ...]`` aligned with
    ``posts``; the result does not depend on the order of ``posts``.
    """
    t = thresholds
    common: list[str | None] = []
    for post in posts:
        if post["non_english"]:
            common.append(NON_ENGLISH)
        elif post["advertisement"]:
            common.append(ADVERTISEMENT)
        else:
            common.append(None)
    n_flagged = sum(1 for status in common if status is not None)
    if is_bad_user(n_flagged, len(posts), t.max_flagged_posts_min, t.max_flagged_posts_fraction):
        common = [status or BAD_USER for status in common]

    statuses: list[dict[str, str]] = [{} for _ in posts]
    for task in TASKS:
        survivors = []
        for i, post in enumerate(posts):
            if common[i] is not None:
                statuses[i][task] = common[i]
                continue
            rule = length_rule(len(post[f"{task}_tokens"]), t.min_tokens, t.max_tokens)
            if rule is not None:
                statuses[i][task] = rule
            else:
                survivors.append(i)
        survivors.sort(key=lambda i: recency_key(posts[i]))
        for i in survivors[t.max_posts_per_user :]:
            statuses[i][task] = OVER_USER_CAP
        survivors = survivors[: t.max_posts_per_user]
        final = TOO_FEW_USER_POSTS if len(survivors) < t.min_posts_per_user else KEPT
        for i in survivors:
            statuses[i][task] = final
    return statuses
