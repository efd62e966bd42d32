"""Synthetic users: what they post about and how they write."""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from csmn.synth.config import SynthConfig
from csmn.synth.streams import derive_seed, zipf_cum_weights
from csmn.synth.vocabulary import (
    CATEGORIES,
    CLOSERS,
    EPOCH_START,
    GENERAL_ADJECTIVES,
    GLOBAL_EMOJI,
    GLOBAL_TAGS,
    NAMES,
    NICHES,
    NICHES_BY_CATEGORY,
    OPENERS,
    PUNCTUATION_HABITS,
    Category,
)


@dataclass
class UserProfile:
    """One synthetic user: what they post about and how they write."""

    index: int
    user_id: str
    kind: str
    n_posts: int
    favourite_categories: list[int]
    category_weights: list[float]
    niches: list[int]  # indices into NICHES, the first in the primary category
    niche_weights: list[list[float]]  # per niche: cumulative preferences over its hashtags
    owner_name: str
    names: list[str]
    friends: list[str]
    signature_hashtags: list[str]
    signature_rates: list[float]
    signature_first: bool
    favourite_tags: list[str]
    emoji: list[str]
    emoji_rate: float
    openers: list[str]
    opener_rate: float
    closers: list[str]
    closer_rate: float
    favourite_adjectives: list[str]
    adjective_rate: float
    name_rate: float
    punctuation: str
    start: datetime
    mean_gap_hours: float
    bad_posts: frozenset[int]  # post indices planted as non-English/advertising (spammers)

    def niches_in(self, category: int) -> list[int]:
        """Positions in ``niches`` of the user's niches inside ``category`` (often none)."""
        return [k for k, n in enumerate(self.niches) if NICHES[n].category == category]

    def truth_row(self, categories: Sequence[Category]) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "kind": self.kind,
            "n_posts": self.n_posts,
            "favourite_categories": [categories[c].name for c in self.favourite_categories],
            "category_weights": self.category_weights,
            "niches": [NICHES[n].name for n in self.niches],
            "niche_categories": [categories[NICHES[n].category].name for n in self.niches],
            "names": self.names,
            "friends": self.friends,
            "signature_hashtags": self.signature_hashtags,
            "favourite_tags": self.favourite_tags,
            "emoji": self.emoji,
            "openers": self.openers,
            "closers": self.closers,
            "favourite_adjectives": self.favourite_adjectives,
            "punctuation": self.punctuation,
            "planted_bad_posts": len(self.bad_posts),
        }


def _post_count(rng: random.Random, config: SynthConfig, kind: str) -> int:
    if kind == "too_few":
        return rng.randint(5, 45)
    if kind == "too_many":
        # Far enough above 1,000 that dropping every noisy post still leaves more than 1,000.
        return rng.randint(1300, 1600)
    mu = math.log(config.posts_median)
    for _ in range(1000):
        count = int(round(rng.lognormvariate(mu, config.posts_sigma)))
        if config.posts_min <= count <= config.posts_max:
            return count
    return min(max(int(config.posts_median), config.posts_min), config.posts_max)


def _user_kind(rng: random.Random, config: SynthConfig) -> str:
    u = rng.random()
    for kind, rate in (
        ("too_few", config.too_few_users_rate),
        ("too_many", config.too_many_users_rate),
        ("spammer", config.spammer_users_rate),
    ):
        if u < rate:
            return kind
        u -= rate
    return "regular"


def _favourite_categories(
    rng: random.Random, n_categories: int
) -> tuple[list[int], list[float]]:
    """1-3 favourite categories, drawn by a skewed popularity (food and fashion are everywhere,
    tech less so), and each one's share of the user's on-topic posts."""
    n_favourites = rng.choices((1, 2, 3), weights=(0.3, 0.4, 0.3))[0]
    popularity = zipf_cum_weights(n_categories, 0.6)
    favourites: list[int] = []
    while len(favourites) < min(n_favourites, n_categories):
        pick = bisect.bisect_left(popularity, rng.random() * popularity[-1])
        if pick not in favourites:
            favourites.append(pick)
    raw_weights = sorted((rng.uniform(0.2, 1.0) for _ in favourites), reverse=True)
    return favourites, [round(w / sum(raw_weights), 4) for w in raw_weights]


def _signature_tags(
    rng: random.Random, config: SynthConfig, index: int, owner: str, companion: str,
    primary: Category, secondary: Category,
) -> tuple[list[str], list[float]]:
    """2-4 hashtags only this user writes, and the chance of each in one of their posts."""
    # The user index as suffix makes each signature tag unique to its user: the names and
    # stems are letters only, so no two users can produce the same string.
    suffix = str(index)
    patterns = [
        f"#{owner}{rng.choice(primary.stems)}{suffix}",
        f"#{owner}and{companion}{suffix}",
        f"#{rng.choice(GENERAL_ADJECTIVES)}{owner}{suffix}",
        f"#team{owner}{suffix}",
        f"#{owner}{rng.choice(secondary.stems)}{suffix}",
    ]
    signature: list[str] = []
    for tag in rng.sample(patterns, len(patterns)):
        if tag not in signature:
            signature.append(tag)
    signature = signature[: rng.randint(2, 4)]
    mean_rate = min(max(config.signature_tag_rate, 0.0), 1.0)
    spread = min(mean_rate, 1.0 - mean_rate, 0.2)
    rates = [round(rng.uniform(mean_rate - spread, mean_rate + spread), 3) for _ in signature]
    return signature, rates


def _niches(
    rng: random.Random, config: SynthConfig, favourites: list[int]
) -> tuple[list[int], list[list[float]]]:
    """One or two niches inside the favourite categories, and the member's own cumulative
    preference weights over each niche's hashtag pool.

    The first niche sits in the primary category; a second one in the next favourite category
    (or, with a single favourite, beside the first). The preferences are the pool's shared
    popularity times a log-normal factor per member: members agree on the head of the pool
    but each has their own favourites in it."""
    first = rng.choice(NICHES_BY_CATEGORY[favourites[0]])
    chosen = [first]
    if rng.random() < config.second_niche_rate:
        home = favourites[1] if len(favourites) > 1 else favourites[0]
        candidates = [n for n in NICHES_BY_CATEGORY[home] if n != first]
        if candidates:
            chosen.append(rng.choice(candidates))
    weights = []
    for niche in chosen:
        pool = len(NICHES[niche].hashtags)
        raw = [rng.lognormvariate(0.0, config.niche_preference_sigma) / (rank + 1)
               for rank in range(pool)]
        cumulative, total = [], 0.0
        for w in raw:
            total += w
            cumulative.append(round(total, 6))
        weights.append(cumulative)
    return chosen, weights


def make_user(config: SynthConfig, index: int) -> UserProfile:
    """User ``index`` of the archive, from its own random stream."""
    rng = random.Random(derive_seed(config.seed, "user", index))
    categories = CATEGORIES[: config.categories]
    kind = _user_kind(rng, config)
    n_posts = _post_count(rng, config, kind)
    favourites, weights = _favourite_categories(rng, len(categories))
    niches, niche_weights = _niches(rng, config, favourites)

    owner = rng.choice(NAMES)
    companions = rng.sample([n for n in NAMES if n != owner], rng.randint(1, 2))
    primary = categories[favourites[0]]
    signature, signature_rates = _signature_tags(
        rng, config, index, owner, companions[0], primary, categories[favourites[-1]]
    )
    emoji = rng.sample(list(primary.emoji), 2) + rng.sample(list(GLOBAL_EMOJI), rng.randint(0, 2))
    friends = [
        f"{rng.choice(NAMES)}{rng.choice(('_', '.', ''))}{rng.choice(primary.nouns)}"
        f"{rng.randint(1, 99)}"
        for _ in range(2)
    ]
    bad_posts: frozenset[int] = frozenset()
    if kind == "spammer":
        # Plant more bad posts than max(15, 0.15 x posts): the whole user must be dropped.
        n_bad = max(16, math.ceil(config.spammer_bad_fraction * n_posts))
        n_bad = min(n_bad, n_posts)
        bad_posts = frozenset(rng.sample(range(n_posts), n_bad))

    return UserProfile(
        index=index,
        user_id=f"u{index:06d}",
        kind=kind,
        n_posts=n_posts,
        favourite_categories=favourites,
        category_weights=weights,
        niches=niches,
        niche_weights=niche_weights,
        owner_name=owner,
        names=[n.capitalize() for n in companions],
        friends=friends,
        signature_hashtags=signature,
        signature_rates=signature_rates,
        signature_first=rng.random() < 0.5,
        favourite_tags=rng.sample(list(GLOBAL_TAGS), 3),
        emoji=emoji,
        emoji_rate=rng.uniform(0.2, 0.8),
        openers=rng.sample(list(OPENERS), rng.randint(1, 2)),
        opener_rate=rng.uniform(0.1, 0.45),
        closers=rng.sample(list(CLOSERS), 1),
        closer_rate=rng.uniform(0.1, 0.4),
        favourite_adjectives=rng.sample(list(GENERAL_ADJECTIVES), 3),
        adjective_rate=rng.uniform(0.2, 0.5),
        name_rate=rng.uniform(0.1, 0.35),
        punctuation=rng.choice(PUNCTUATION_HABITS),
        start=EPOCH_START + timedelta(days=rng.uniform(0, 4.5 * 365)),
        mean_gap_hours=rng.uniform(12, 120),
        bad_posts=bad_posts,
    )
