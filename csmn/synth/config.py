"""What ``csmn synth`` generates: one dataclass of knobs, rates per post unless named per user."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SynthConfig:
    """What to generate. Rates are per post unless named ``*_users_rate`` (per user)."""

    out: str = field(default="", metadata={"help": "archive root: a local folder or s3://"})
    users: int = field(default=100, metadata={"help": "number of users (~5,800 for 1.1M posts)"})
    seed: int = field(default=0, metadata={"help": "same seed, byte-identical archive"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing archive"})
    posts_per_shard: int = field(default=10_000, metadata={"help": "lines per posts/ shard"})
    categories: int = field(default=27, metadata={"help": "how many of the 27 categories"})
    image_size: int = field(default=64, metadata={"help": "side of the square JPEGs, pixels"})
    image_quality: int = field(default=90, metadata={"help": "JPEG quality"})
    image_threads: int = field(default=4, metadata={"help": "threads drawing and writing images"})
    write_images: bool = field(default=True, metadata={"help": "false: posts and truth only"})
    # Lengths (paper Table 1: 8.55 words per caption, 7.45 hashtags per list, both 3..15).
    caption_mean_words: float = 8.5
    hashtag_mean_count: float = 7.5
    # Posts per user of a regular user: log-normal, truncated to [posts_min, posts_max]. The
    # floor leaves a regular user above the paper's 50 after the post-level noise is dropped.
    posts_median: float = 100.0
    posts_sigma: float = 0.8
    posts_min: int = 75
    posts_max: int = 1000
    off_topic_rate: float = field(
        default=0.08, metadata={"help": "posts whose category is drawn from all categories "
                                        "instead of the user's favourites (some land in a "
                                        "favourite: 0.072 measured with 27 categories)"}
    )
    signature_tag_rate: float = field(
        default=0.45, metadata={"help": "mean chance a signature hashtag is in a user's post"}
    )
    # Niches (communities inside a category that share tags and words, see csmn.synth).
    second_niche_rate: float = field(
        default=0.6, metadata={"help": "users who belong to a second niche"}
    )
    niche_tag_rate: float = field(
        default=0.65, metadata={"help": "chance each non-signature tag of a niche post is "
                                        "drawn from the niche (a duplicate is drawn again, so "
                                        "the share that ends in a post is lower: 0.58 "
                                        "measured)"}
    )
    niche_word_rate: float = field(
        default=0.3, metadata={"help": "share of a niche post's topic nouns from the niche"}
    )
    niche_preference_sigma: float = field(
        default=0.3, metadata={"help": "spread of a member's preferences over the niche's pool"}
    )
    # User-level noise.
    too_few_users_rate: float = field(default=0.05, metadata={"help": "users with 5..45 posts"})
    too_many_users_rate: float = field(
        default=0.01, metadata={"help": "users with 1,300..1,600 posts"}
    )
    spammer_users_rate: float = field(
        default=0.03, metadata={"help": "users whose non-English/link posts trip the user rule"}
    )
    spammer_bad_fraction: float = 0.4
    # Post-level noise.
    non_english_rate: float = 0.05
    link_rate: float = 0.03
    short_caption_rate: float = 0.04
    long_caption_rate: float = 0.04
    short_hashtags_rate: float = 0.05
    long_hashtags_rate: float = 0.04
    mention_rate: float = 0.05
    zwj_emoji_rate: float = 0.05
    bare_hashtags_rate: float = field(
        default=0.05, metadata={"help": "posts whose hashtags are written without '#'"}
    )
    broken_record_rate: float = 0.005
    broken_image_rate: float = 0.005


RATE_FIELDS = tuple(
    f.name for f in dataclasses.fields(SynthConfig) if f.name.endswith(("_rate", "_fraction"))
)
