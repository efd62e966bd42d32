"""csmn.core.predictor: the one decoding path, on tiny random checkpoints; and the served
model (a real MLflow pyfunc, SQLite store) against the evaluation job's Ray Data actor."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from helpers import rig_logits
from mlflow.tracking import MlflowClient

from csmn.core.checkpoint import save_checkpoint
from csmn.core.model import CSMN, ModelConfig
from csmn.core.predictor import Predictor
from csmn.core.tokens import EOS_ID, GO_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID

TAGS = ["#a", "#b", "#c", "#d", "#e", "#f", "#x", "#y"]
VOCAB = [*SPECIAL_TOKENS, *TAGS]
ID = {w: i for i, w in enumerate(VOCAB)}


def _config(**overrides) -> ModelConfig:
    return ModelConfig(vocab_size=len(VOCAB), embed_dim=8, memory_dim=16, context_size=5,
                       max_length=8, cnn_depth=4, **overrides)


def _save(directory: str, model: CSMN, task: str = "hashtag") -> str:
    save_checkpoint(directory, model, model.config, VOCAB, task)
    return directory


def _random(seed: int = 0, **overrides) -> CSMN:
    torch.manual_seed(seed)
    return CSMN(_config(**overrides)).eval()


def rigged(preferences: dict[int, float]) -> CSMN:
    return rig_logits(_random(), preferences)


def _features(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2048)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return _save(str(tmp_path_factory.mktemp("predictor") / "ckpt"), _random())


def test_context_words_out_of_vocabulary_and_special_tokens_are_dropped(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    words = ["#a", "unknown", "_UNK", "_PAD", "#b", "_EOS", "#c", "#d", "#e", "#f"]
    # five real words kept, in order, then cut at D = 5
    assert predictor.context_ids(words) == [ID[w] for w in ["#a", "#b", "#c", "#d", "#e"]]
    assert predictor.context_ids("#a nope #b") == [ID["#a"], ID["#b"]]
    assert predictor.context_ids(None) == [] == predictor.context_ids(["zz", "_GO"])

    features = _features(4)
    contexts = [["#a", "zz"], ["zz", "yy", "_UNK"], None, "#x #y"]
    result = predictor.predict(features, contexts)
    assert result.used_context == [True, False, False, True]
    # an all-OOV context is exactly no context: every slot masked
    alone = predictor.predict(features[1:3], [[], []])
    assert result.words[1:3] == alone.words
    # a space-joined string is the same context as its words
    assert predictor.predict(features[3:], [["#x", "#y"]]).words == result.words[3:]


def test_a_model_without_user_context_never_uses_it(tmp_path):
    predictor = Predictor.from_checkpoint(_save(str(tmp_path), _random(use_user_context=False)))
    assert predictor.predict(_features(2), [["#a"], ["#b"]]).used_context == [False, False]


def test_special_tokens_never_become_words_and_hashtags_hold_each_tag_once(tmp_path):
    # the rigged model prefers _PAD, _GO, _UNK over every word, then #x, then #y; _EOS last
    model = rigged({PAD_ID: 9.0, GO_ID: 8.0, UNK_ID: 7.0, ID["#x"]: 5.0, ID["#y"]: 4.0,
                    EOS_ID: -9.0})
    blocked = Predictor.from_checkpoint(_save(str(tmp_path / "h"), model))
    deduped = Predictor.from_checkpoint(str(tmp_path / "h"), repeats="paper")
    posts = Predictor.from_checkpoint(_save(str(tmp_path / "p"), model, task="post"),
                                      repeats="paper")
    post_runs = Predictor.from_checkpoint(str(tmp_path / "p"))
    for beam_width in (1, 3):
        for predictor in (blocked, deduped, posts, post_runs):
            predictor.beam_width = beam_width
        # the paper's rule: 8 steps of #x, one hashtag once; the post keeps every word
        assert deduped.predict(_features(2), [None, ["#a"]]).words == [["#x"], ["#x"]]
        assert posts.predict(_features(1), [None]).words == [["#x"] * 8]
        # the default for posts: a word at most twice in a row, a 3-word phrase at most once
        words = post_runs.predict(_features(1), [None]).words[0]
        phrases = list(zip(words, words[1:], words[2:], strict=False))
        assert len(words) == 8 and words[:2] == ["#x", "#x"]
        assert all(len(set(phrase)) > 1 for phrase in phrases)
        assert len(set(phrases)) == len(phrases)
        # greedy: x x y x x, and then x x y again would repeat a phrase: the third-best word
        assert beam_width > 1 or words[:6] == ["#x", "#x", "#y", "#x", "#x", "#a"]
        # the default: a repeat is forbidden while decoding, so the 8 steps give 8 tags, the
        # two best first (greedy in order; a beam may find the other order scores higher)
        for words in blocked.predict(_features(2), [None, ["#a"]]).words:
            assert set(words[:2]) == {"#x", "#y"} and len(words) == len(set(words)) == 8
            assert beam_width > 1 or words[:2] == ["#x", "#y"]
            assert not set(SPECIAL_TOKENS) & set(words)
    assert not set(SPECIAL_TOKENS) & {w for ws in deduped.predict(_features(3), [None] * 3)
                                      .words for w in ws}
    with pytest.raises(ValueError, match="repeats must be one of block, paper"):
        Predictor.from_checkpoint(str(tmp_path / "h"), repeats="keep")


def test_batches_attention_and_res5c_rows(tmp_path, checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, batch_size=3)
    features, contexts = _features(7), [["#a", "#b"]] * 7
    batched = predictor.predict(features, contexts, with_attention=True)
    whole = Predictor.from_checkpoint(checkpoint, batch_size=64).predict(features, contexts)
    assert batched.words == whole.words
    assert len(batched.attention) == 7
    for words, attention in zip(batched.words, batched.attention, strict=True):
        assert set(attention) == {"image", "context", "output"}
        steps = attention["image"].shape[0]
        assert steps in (len(words) + 1, predictor.config.max_length)  # _EOS step, or cut
        total = sum(a.sum(axis=1) for a in attention.values())
        np.testing.assert_allclose(total, 1.0, rtol=1e-5)  # one softmax over all memories

    res5c = Predictor.from_checkpoint(_save(str(tmp_path), _random(image_layer="res5c")))
    grid = np.random.default_rng(2).normal(size=(2, 49, 2048)).astype(np.float32)
    as_rows = [row.reshape(-1).tolist() for row in grid]
    assert res5c.predict(grid, [None, None]).words == res5c.predict(as_rows, [None, None]).words


def test_wrong_feature_sizes_and_settings_are_refused(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"2048 floats per row for pool5; rows \[1\]"):
        predictor.predict([np.zeros(2048), np.zeros(49 * 2048)], [None, None])
    with pytest.raises(ValueError, match="2048 floats per row"):
        predictor.predict(np.zeros((2, 1024), np.float32), [None, None])
    with pytest.raises(ValueError, match="2 feature rows but 1 contexts"):
        predictor.predict(_features(2), [None])
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        Predictor.from_checkpoint(checkpoint, device="tpu")
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        Predictor.from_checkpoint(checkpoint, beam_width=0)


def test_the_pyfunc_and_the_evaluation_actor_give_the_same_words(ray_session, checkpoint,
                                                                 tmp_path):
    import ray

    from csmn.pipeline.evaluate import Decoder
    from csmn.tracking import log_pyfunc_model

    features = _features(6, seed=3)
    contexts = [["#a", "#b"], ["zz"], None, ["#x", "#y", "#c"], [], ["#f", "_UNK"]]
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.set_experiment("predictor-test").experiment_id
    run_id = MlflowClient(tracking_uri).create_run(experiment_id).info.run_id
    info = log_pyfunc_model(tracking_uri, run_id, checkpoint, "hashtag")
    # no context (a user with no history) is a missing cell, as the Predictor takes it
    served = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({
        "image_feature": [row.tolist() for row in features],
        "context_words": contexts}))

    images = [f"img{i}.jpg" for i in range(6)]
    # Post ids are unique per user only: two users each have a post "p0", "p1", "p2".
    keys = [(f"u{i % 2}", f"p{i // 2}") for i in range(6)]
    examples = pa.table({"user_id": [u for u, _ in keys], "post_id": [p for _, p in keys],
                         "image": images,
                         "context_words": pa.array(contexts, pa.list_(pa.string()))})
    actor = Decoder(ray.put(examples), checkpoint, None, 1, False, 4)
    decoded = actor(pa.table({"image": images[::-1], "feature": pa.array(
        [row.tolist() for row in features[::-1]], pa.list_(pa.float32()))}))
    by_post = dict(zip(zip(decoded.column("user_id").to_pylist(),
                           decoded.column("post_id").to_pylist(), strict=True),
                       decoded.column("prediction").to_pylist(), strict=True))

    direct = Predictor.from_checkpoint(checkpoint).predict(features, contexts).words
    assert [list(p) for p in served["prediction"]] == direct
    assert [by_post[key] for key in keys] == direct
    assert any(direct), "the random model must say something for the test to mean anything"
