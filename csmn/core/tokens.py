"""The special tokens every vocabulary starts with, and their ids (paper 4.1; section
"Vocabulary" of docs/method.md): ``_PAD``=0, ``_GO``=1, ``_EOS``=2, ``_UNK``=3, then words.

This is the one definition: the model, decoding, vocabularies and metrics all read it.
"""

from __future__ import annotations

from csmn.data.layout import HASHTAG

PAD, GO, EOS, UNK = "_PAD", "_GO", "_EOS", "_UNK"
SPECIAL_TOKENS = (PAD, GO, EOS, UNK)
PAD_ID, GO_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# The first id that is a real word.
FIRST_WORD_ID = len(SPECIAL_TOKENS)
# Tokens a decoder must never emit: padding, the start marker, and "unknown" (a guess that
# is always wrong). ``_EOS`` ends a sequence and is never part of its words.
NEVER_EMITTED_IDS = (PAD_ID, GO_ID, UNK_ID)
# Markers that never belong to a scored prediction (``_UNK`` stays: it is a wrong guess).
MARKERS = frozenset({PAD, GO, EOS})

# How a hashtag list treats a tag the model emits twice.
BLOCK, DEDUPE = "block", "dedupe"
HASHTAG_REPEATS = (BLOCK, DEDUPE)


def task_rules(task: str, hashtag_repeats: str = BLOCK) -> dict[str, bool]:
    """``block_repeats`` / ``dedupe_tokens`` for a task: hashtags are deduplicated after
    decoding (``dedupe``, the paper's 4.2) or their repeats forbidden while decoding
    (``block``, the default: a list never holds a tag twice, so a repeat is a wasted step;
    csmn.core.decoding); post texts keep every word."""
    if hashtag_repeats not in HASHTAG_REPEATS:
        raise ValueError(f"hashtag_repeats must be one of {', '.join(HASHTAG_REPEATS)}, "
                         f"got {hashtag_repeats!r}")
    hashtags = task == HASHTAG
    return {"block_repeats": hashtags and hashtag_repeats == BLOCK, "dedupe_tokens": hashtags}
