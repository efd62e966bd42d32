"""The paper's ordering on the synthetic archive, end to end: synth -> preprocess (Ray Data) ->
pool5 with random ResNet-101 weights at a tiny crop -> CSMN-P5 and CSMN-NoUC-P5 trained by
Ray Train at a tiny size -> evaluated (Ray Data decoding, hashtag F1) with 1NN-UsrIm, through
csmn.experiments.ablation, with a real MLflow SQLite store.

Which split. The synthetic users' signature hashtags (``#rosebakes17``) are unique to their
user and sit in most of that user's posts, so they head the user's TF-IDF context. Split by
posts, every test user also has training posts: the signature tags are in the vocabulary and
the model learns to copy them from the context memory. A model without user context can only
guess whose image it sees from its category (the images carry nothing of their user); with 14
users a category often belongs to one or two of them, so NoUC still names some signature tags
(measured 0.31 against P5's 0.38), but it cannot do so as well as P5. That makes CSMN-P5 >
CSMN-NoUC-P5 a consequence of the archive's structure there. Split by users, a test user's
signature tags never occur in training: they are out of the vocabulary, unpredictable for
every method, and the model writes the signature tags of the training user whose context
looks most like theirs instead (README, "The paper's tables on our data"): no ordering is
guaranteed there at these sizes.
1NN-UsrIm, split by posts, finds the query user itself and returns the tags of one of its
posts (of the same category, by the image): one sample of the user's tag distribution. A
model that learned the distribution returns its most likely tags instead, and the most
likely tags agree with a new post more often than another post does: on this archive the
user-and-category mode scores F1 0.44-0.48 (6-8 tags) against 0.32 for a same-user,
same-category post (tests' archive, from the truth tables). CSMN-P5 at this size measured
0.37-0.38 against 1NN-UsrIm's 0.31 (three seeds, plain PyTorch loop) and 0.380 against 0.321
through this very path (csmn.experiments.ablation, Ray), so the test asks for a margin of
0.02 over it (the paper: 0.390 vs 0.380). The split-by-users ordering, which niche
communities are for, is issue #16's and not asserted here yet.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from csmn.data import storage
from csmn.experiments.ablation import (
    PAPER_TABLES,
    AblationConfig,
    build_parser,
    build_table,
    paper_name,
    run_ablation,
)

USERS = 14


@pytest.fixture(scope="module")
def data_root(ray_session, tmp_path_factory) -> str:
    from csmn.pipeline.extract import ExtractConfig, run_extract
    from csmn.pipeline.preprocess import PreprocessConfig, preprocess
    from csmn.synth import SynthConfig, write_archive

    base = tmp_path_factory.mktemp("ablation")
    archive, root = str(base / "archive"), str(base / "data")
    # Random ResNet-101 weights, but with each residual branch's last BatchNorm at zero
    # (torchvision's zero_init_residual): torchvision's plain random init lets 33 residual
    # additions grow pool5 to ~1e4, and an image-only model (NoUC) then collapses to the
    # unigram distribution -- the ordering would hold for a wrong reason.
    torch.manual_seed(0)
    weights = str(base / "resnet101-random-zero-residual.pt")
    torch.save(torchvision.models.resnet101(zero_init_residual=True).state_dict(), weights)
    # This ordering rests on signature tags (above), so the archive is the one the figures
    # were measured on: signature tags at 0.6 and no niche tags or words (with niches, the
    # by-posts P5 measured 0.363 and 0.403 against 1NN-UsrIm's 0.359 in two runs: niche
    # tags shared across users lift the copy-a-post baseline at this size).
    write_archive(SynthConfig(out=archive, users=USERS, seed=1, image_size=32, image_threads=2,
                              posts_median=70, posts_min=60, posts_max=90,
                              signature_tag_rate=0.6, niche_tag_rate=0.0, niche_word_rate=0.0))
    preprocess(archive, root, PreprocessConfig(seed=0, min_posts_per_user=30))
    run_extract(ExtractConfig(data=root, layer="pool5", weights=weights, seed=0,
                              crop_size=32, resize_size=32, batch_size=64))
    return root


def test_names_tables_and_switches():
    assert paper_name("P5") == "CSMN-P5"
    assert paper_name("NoUC-P5") == paper_name("CSMN-NoUC-P5") == "CSMN-NoUC-P5"
    assert paper_name("W20") == "CSMN-W20-P5" and paper_name("R5C") == "CSMN-R5C"
    with pytest.raises(ValueError, match="unknown CSMN variant part"):
        paper_name("NoXY-P5")
    # every figure of both paper tables is there (13 methods each)
    assert len(PAPER_TABLES["hashtag"]) == len(PAPER_TABLES["post"]) == 13
    assert PAPER_TABLES["hashtag"]["CSMN-P5"] == {"f1": 0.230, "f1_by_posts": 0.390}
    assert PAPER_TABLES["post"]["CSMN-P5"]["cider"] == 0.214
    rows = build_table("hashtag", {"CSMN-P5": {"by_posts": {"results": {"f1": 0.5}}}},
                       ["by_users", "by_posts"])
    p5 = next(r for r in rows if r["method"] == "CSMN-P5")
    assert p5["cells"]["F1 by posts"] == {"ours": 0.5, "paper": 0.390}
    assert p5["cells"]["F1 by users"] == {"ours": None, "paper": 0.230}
    args = build_parser().parse_args(["--small", "--epochs", "2", "--use-gpu"])
    assert (args.small, args.epochs, args.use_gpu) == ("true", "2", "true")
    assert build_parser().parse_args(["--small", "false"]).small == "false"
    with pytest.raises(ValueError, match="by posts exists for the hashtag task only"):
        AblationConfig(data="x", task="post", splits="by_posts")


def test_paper_ordering_on_hashtags_split_by_posts(data_root, mlflow_tracking_uri, tmp_path):
    out = str(tmp_path / "ablation")
    result = run_ablation(AblationConfig(
        data=data_root, task="hashtag", variants="P5,NoUC-P5", splits="by_posts",
        baselines="1nn-usrim", epochs=16, batch_size=32, learning_rate=0.003,
        embed_dim=64, memory_dim=128, cnn_depth=32, val_sample_size=200, seed=0,
        cpus_per_actor=1.0, out=out))

    f1 = {m: runs["by_posts"]["results"]["f1"] for m, runs in result["methods"].items()}
    assert set(f1) == {"CSMN-P5", "CSMN-NoUC-P5", "1NN-UsrIm"}
    counts = result["methods"]["CSMN-P5"]["by_posts"]["counts"]
    assert counts["scored"] == counts["examples"] > 50
    # the paper's ordering (Table 3, right): P5 above NoUC (guaranteed by the signature
    # tags). The margin is not asserted: the same seed still trains a different model from
    # run to run (Ray Train's ingest keeps the data order now, but five runs on one machine
    # gave P5 0.368-0.397 and NoUC 0.328-0.358, margins 0.016-0.042; 1NN-UsrIm 0.326 each
    # time)...
    assert f1["CSMN-P5"] > f1["CSMN-NoUC-P5"], f1
    # ... and above 1NN-UsrIm (the paper's 0.390 vs 0.380).
    assert f1["CSMN-P5"] > f1["1NN-UsrIm"] + 0.02, f1
    # ... and the reason: P5 names the user's context words, NoUC hardly ever
    share = {m: result["methods"][m]["by_posts"]["results"]["context_share"]
             for m in ("CSMN-P5", "CSMN-NoUC-P5")}
    assert share["CSMN-P5"] > share["CSMN-NoUC-P5"], share

    # the table: ours beside the paper's, in markdown and JSON
    markdown = storage.read_text(storage.join(out, "ablation.md"))
    assert "| CSMN-P5 | " in markdown and "0.390" in markdown
    saved = storage.read_json(storage.join(out, "ablation.json"))
    row = next(r for r in saved["table"] if r["method"] == "CSMN-NoUC-P5")
    assert row["cells"]["F1 by posts"]["paper"] == 0.076
    assert row["cells"]["F1 by posts"]["ours"] == pytest.approx(f1["CSMN-NoUC-P5"])

    # MLflow: the table as metrics of the ablation run, one evaluation run per variant
    client = MlflowClient(mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("csmn-hashtag-ablation")
    ablation_run = client.get_run(result["mlflow_run_id"])
    assert ablation_run.data.metrics["CSMN-P5/f1/by_posts"] == pytest.approx(f1["CSMN-P5"])
    artifacts = {a.path for a in client.list_artifacts(result["mlflow_run_id"])}
    assert {"ablation.md", "ablation.json"} <= artifacts
    evaluations = client.search_runs([experiment.experiment_id],
                                     filter_string="tags.`csmn.kind` = 'evaluation'")
    assert len(evaluations) == 2
    for run in evaluations:
        assert run.data.tags["csmn.split"] == "test_by_posts"
        assert run.data.tags["csmn.model_uri"].startswith("models:/")
        assert "csmn/f1" in run.data.metrics
    # the HTML report embeds thumbnails and marks the context words a prediction used
    html = storage.read_text(storage.join(out, "reports", "CSMN-P5-by_posts", "report.html"))
    assert "data:image/jpeg;base64," in html and 'class="ctx"' in html
