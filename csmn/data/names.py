"""The names the stages share that need nothing to import: tasks, splits, image layers.

Kept apart from :mod:`csmn.data.layout` (which re-exports them, and adds the paths) because
the model, the decoders and the feature extractor import them, and those must run on a bare
GPU box with torch alone: layout's storage needs pyarrow.
"""

from __future__ import annotations

POST, HASHTAG = "post", "hashtag"
TASKS = (POST, HASHTAG)
# Names a command line also accepts for a task.
TASK_ALIASES = {"caption": POST}
# The registered MLflow model of each task.
REGISTERED_MODEL_NAMES = {HASHTAG: "csmn-hashtag", POST: "csmn-post"}

TRAIN, VAL, TEST = "train", "val", "test"
BY_USERS_SPLITS = (TRAIN, VAL, TEST)
BY_POSTS_SUFFIX = "_by_posts"
TRAIN_BY_POSTS, VAL_BY_POSTS, TEST_BY_POSTS = (s + BY_POSTS_SUFFIX for s in BY_USERS_SPLITS)
BY_POSTS_SPLITS = (TRAIN_BY_POSTS, VAL_BY_POSTS, TEST_BY_POSTS)
SPLITS = BY_USERS_SPLITS + BY_POSTS_SPLITS
# The task that also gets a split by posts (paper 5.1).
BY_POSTS_TASK = HASHTAG
# The families of splits: (train, val, test) of each.
SPLIT_FAMILIES = {"by_users": BY_USERS_SPLITS, "by_posts": BY_POSTS_SPLITS}

# Image layers of ResNet-101 and their memory slots (paper 4.1): pool5 is one 2048-d slot,
# res5c a 7 x 7 grid of them at a 224 crop.
FEATURE_DIM = 2048
IMAGE_SLOTS = {"pool5": 1, "res5c": 49}
LAYERS = tuple(IMAGE_SLOTS)


def canonical_task(name: str) -> str:
    """``post`` or ``hashtag``; ``caption`` is accepted for ``post``."""
    task = TASK_ALIASES.get(name, name)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return task
