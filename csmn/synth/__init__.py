"""A synthetic Instagram-like archive with the statistics and the learnable structure of InstaPIC.

The released InstaPIC-1.1M data can no longer be downloaded, so ``csmn synth`` writes an archive
that the rest of the pipeline treats exactly like user data (the raw-archive contract in
``schemas/raw_post.json``)::

    <out>/posts/part-NNNNN.jsonl        raw posts, one JSON object per line
    <out>/images/<user_id>/<post_id>.jpg small JPEGs drawn with PIL
    <out>/truth/users/part-NNNNN.parquet what each user is made of (schemas/truth_user.json)
    <out>/truth/posts/part-NNNNN.parquet what each post is made of (schemas/truth_post.json)
    <out>/truth/summary.json            the config and the planted counts

What can be learned from it:

- 27 categories (the paper crawled 27 Pinterest categories, section 3.1), each with a visual
  signature (palette, shape, texture) and a topic vocabulary of English words and hashtags.
- Niches inside the categories (sourdough bakers, trail runners): groups of users who share a
  pool of hashtags and words, each member with their own preferences over it. The image tells
  the category, only the user's context tells the niche, and a niche tag can be learned from
  other users: personalization that generalizes to new users (split by users, Tables 2-3).
- Users with 1-3 favourite categories, one or two niches and a personal vocabulary: signature
  hashtags that no other user writes (``#rosebakes17``), names of the people and pets in their
  posts, favourite emoji and adjectives, openers and closers they keep using.
- Captions of 8.5 words and hashtag lists of 7.5 tags on average (Table 1 of the paper).

And the noise the paper's filters exist for (section 3.1), each at its own rate (``*_rate``
knobs), with truth tables that say which post got which noise so that every filter can be
checked against them; :func:`reference_scores` reads them back into the hashtag F1 of
reference predictors (what an image tells, what a new user's niche tells, what copying one of
the user's own posts gives) to print beside a model's. Users are generated one at a time,
posts shard by shard, images through a bounded thread pool: memory stays flat however large
the archive.
"""

from csmn.synth.config import SynthConfig
from csmn.synth.images import draw_image
from csmn.synth.posts import iter_user_posts
from csmn.synth.streams import derive_seed, length_cum_weights
from csmn.synth.truth import reference_scores
from csmn.synth.users import UserProfile, make_user
from csmn.synth.vocabulary import CATEGORIES, FOREIGN_WORDS, NICHES, english_vocabulary
from csmn.synth.writer import hold_back_newest, main, write_archive

__all__ = [
    "hold_back_newest",
    "CATEGORIES",
    "FOREIGN_WORDS",
    "NICHES",
    "SynthConfig",
    "UserProfile",
    "derive_seed",
    "draw_image",
    "english_vocabulary",
    "iter_user_posts",
    "length_cum_weights",
    "main",
    "make_user",
    "reference_scores",
    "write_archive",
]
