"""The special tokens every vocabulary starts with, and their ids (paper 4.1; section
"Vocabulary" of docs/method.md): ``_PAD``=0, ``_GO``=1, ``_EOS``=2, ``_UNK``=3, then words.

This is the one definition: the model, decoding, vocabularies and metrics all read it.
"""

from __future__ import annotations

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
