import csv
import json

import numpy as np
import pytest
import torch

from genrec.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from genrec.config import SyntheticConfig
from genrec.data.batches import stochastic_length, train_batches
from genrec.data.sequences import build_sequences, leave_one_out
from genrec.data.synthetic import generate_synthetic
from genrec.evaluation import evaluate_model
from genrec.training import train


@pytest.mark.slow
def test_training_on_synthetic_beats_popularity_by_a_wide_margin(tmp_path, tiny_synthetic_cfg):
    cfg = tiny_synthetic_cfg
    cfg.out_dir = str(tmp_path)
    # The demo's data shape: enough clusters that popularity is weak and successor chains matter.
    cfg.data.synthetic = SyntheticConfig(num_users=2000, num_items=1000, num_clusters=20, mean_length=40, seed=11)
    cfg.data.max_len = 50
    cfg.model.item_emb_dim = cfg.model.dqk = cfg.model.dv = 32
    cfg.loss.num_negatives = 64
    cfg.train.batch_size = 128
    cfg.train.lr = 3e-3  # converges in 10 epochs (~15 s); the recipe's 1e-3 needs ~20
    cfg.train.epochs = 10
    result = train(cfg, progress=False)
    pop, model = result.popularity_test["hr@10"], result.test["hr@10"]
    assert model > 2 * pop and model - pop > 0.1, (model, pop)
    for name in ("config.yaml", "metrics.csv", "learning_curve.png", "checkpoint_best.pt", "results.json", "results.md"):
        assert (result.run_dir / name).is_file(), name
    assert (result.run_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_model(tmp_path, tiny_synthetic_cfg):
    cfg = tiny_synthetic_cfg
    cfg.out_dir = str(tmp_path)
    cfg.train.epochs = 1
    result = train(cfg, progress=False)
    state = load_checkpoint(result.run_dir / "checkpoint_best.pt")
    model, loaded_cfg = model_from_checkpoint(state)
    assert loaded_cfg == cfg
    ds = build_sequences(generate_synthetic(cfg.data.synthetic))
    assert state["item_ids"] == ds.item_ids.tolist()
    metrics = evaluate_model(model, ds, leave_one_out(ds), "test", tuple(cfg.eval.ks))
    assert metrics == pytest.approx(result.test)


def test_corrupt_checkpoint_is_refused(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable genrec checkpoint"):
        load_checkpoint(p)


def interrupted_then_resumed(run, cfg, epochs: int):
    """Train ``epochs`` straight through, and again as 1 epoch + a resume to ``epochs``; returns (full
    result, resumed result, their checkpoint_last.pt states)."""
    cfg.name, cfg.train.epochs = "full", epochs
    full = run(cfg, progress=False)
    cfg.name, cfg.train.epochs = "part", 1
    part = run(cfg, progress=False)
    cfg.train.epochs = epochs
    resumed = run(cfg, resume=part.run_dir / "checkpoint_last.pt", progress=False)
    assert resumed.run_dir == part.run_dir
    a = torch.load(full.run_dir / "checkpoint_last.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "checkpoint_last.pt", weights_only=True)
    assert [r["epoch"] for r in b["history"]] == [r["epoch"] for r in a["history"]]
    assert a["history"][-1]["train_loss"] == pytest.approx(b["history"][-1]["train_loss"], rel=1e-6)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k])
    return full, resumed, a, b


@pytest.mark.slow
def test_runs_are_reproducible_and_resume_matches_uninterrupted(tmp_path, tiny_synthetic_cfg):
    cfg = tiny_synthetic_cfg
    cfg.out_dir = str(tmp_path)
    full, *_ = interrupted_then_resumed(train, cfg, 2)
    cfg.name, cfg.train.epochs = "again", 2
    assert train(cfg, progress=False).test == full.test


def test_stochastic_length_keeps_order_and_expected_size():
    rng = np.random.default_rng(0)
    m = int(np.ceil(200 ** (1.6 / 2)))  # 70
    assert stochastic_length(60, 200, 1.6, rng) is None  # short histories untouched
    kept = [stochastic_length(200, 200, 1.6, rng) for _ in range(2000)]
    sampled = [k for k in kept if k is not None]
    assert all(len(k) == m and np.all(np.diff(k) > 0) for k in sampled)
    assert len(sampled) / len(kept) == pytest.approx(1 - m * m / 200**2, abs=0.04)


@pytest.mark.parametrize("validation", [True, False])
def test_train_batches_supervise_every_prefix_position(validation):
    ds = build_sequences(generate_synthetic(SyntheticConfig(num_users=30, num_items=80, num_clusters=4, seed=2)))
    split = leave_one_out(ds, validation)
    # the held-out tail: test (and validation) targets; without validation the second-to-last event trains
    assert np.array_equal(split.train_end, ds.offsets[1:] - (2 if validation else 1))
    seen_users = []
    for b in train_batches(ds, split, max_len=10, batch_size=7, rng=np.random.default_rng(0)):
        for row, u in enumerate(b.users):
            s, e = int(b.offsets[row]), int(b.offsets[row + 1])
            train_part = ds.items[ds.offsets[u] : split.train_end[u]][-11:]
            assert b.items[s:e].tolist() == train_part[:-1].tolist()
            assert b.targets[s:e].tolist() == train_part[1:].tolist()
            train_times = ds.timestamps[ds.offsets[u] : split.train_end[u]][-11:]
            assert b.timestamps[s:e].tolist() == train_times[:-1].tolist()
            assert b.next_timestamps[s:e].tolist() == train_times[1:].tolist()
        seen_users.extend(b.users.tolist())
    assert sorted(seen_users) == sorted(set(seen_users))  # no duplicated users in an epoch


@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["batch_shared", "per_position"])
def test_mol_trains_jointly_and_round_trips_through_the_checkpoint(tmp_path, tiny_synthetic_cfg, negatives):
    from genrec.checkpoint import similarity_from_checkpoint
    from genrec.config import SimilarityConfig
    from genrec.retrieval.similarity import MoLSimilarity

    cfg = tiny_synthetic_cfg
    cfg.out_dir = str(tmp_path)
    cfg.loss.negatives = negatives
    cfg.similarity = SimilarityConfig(type="mol", query_components=2, item_components=2, component_dim=8,
                                      query_hidden=16, gating_hidden=16)
    result = train(cfg, progress=False)
    state = load_checkpoint(result.run_dir / "checkpoint_best.pt")
    history = load_checkpoint(result.run_dir / "checkpoint_last.pt")["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    sim = similarity_from_checkpoint(state)
    assert isinstance(sim, MoLSimilarity) and not sim.training
    model, _ = model_from_checkpoint(state)
    ds = build_sequences(generate_synthetic(cfg.data.synthetic))
    metrics = evaluate_model(model, ds, leave_one_out(ds), "test", tuple(cfg.eval.ks), similarity=sim)
    assert metrics == pytest.approx(result.test)


DDP_CONFIG = """
name: ddp
data: {format: synthetic, max_len: 20, synthetic: {num_users: 200, num_items: 120, num_clusters: 8, mean_length: 15, seed: 5}}
model: {item_emb_dim: 8, dqk: 8, dv: 8, dropout: 0.0, input_dropout: 0.0}
loss: {num_negatives: 16}
train: {epochs: 1, batch_size: 32, max_steps_per_epoch: 4, lr: 0.01, patience: 0}
eval: {ks: [1, 10]}
"""


@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["per_position", "batch_shared"])
def test_two_process_ddp_matches_single_process_training(tmp_path, negatives):
    """torchrun with 2 gloo ranks, each on its half of every global batch, ends at the same weights
    as one process on the whole batches (dropout off; same negatives by construction)."""
    import subprocess
    import sys

    from genrec.checkpoint import load_checkpoint

    (tmp_path / "cfg.yaml").write_text(DDP_CONFIG)
    common = ["train", "--config", "cfg.yaml", "--no-progress", "--set", f"loss.negatives={negatives}"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "genrec", *common, "--set", "out_dir=single"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "genrec", *common, "--set", "out_dir=ddp"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single/ddp/checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "ddp/ddp/checkpoint_last.pt")
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], rel=1e-5)
    for name, w in a["model"].items():
        torch.testing.assert_close(b["model"][name], w, rtol=1e-4, atol=1e-5, msg=name)
    assert len(list((tmp_path / "ddp").iterdir())) == 1  # only rank 0 made a run directory


def ranking_on_retrieval(cfg, tmp_path, name: str, epochs: int):
    """Train a retrieval run on ``cfg`` in tmp_path, then turn ``cfg`` into a ranking run on its checkpoint."""
    cfg.out_dir, cfg.name = str(tmp_path), "retr"
    retrieval = train(cfg, progress=False)
    cfg.name, cfg.task = name, "ranking"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = epochs, 16, 1e-2
    cfg.ranking.retrieval_checkpoint = str(retrieval.run_dir / "checkpoint_best.pt")
    return cfg


@pytest.mark.slow
def test_ranking_training_learns_and_reranks_retrieval(tmp_path, tiny_synthetic_cfg, monkeypatch):
    """task: ranking beats chance AUC on held-out items, and the two-stage evaluation runs end to end
    on a retrieval checkpoint (reranking keeps the retrieved set, so HR@rerank_k is unchanged)."""
    from genrec.ranking_training import train_ranking

    cfg = ranking_on_retrieval(tiny_synthetic_cfg, tmp_path, "rank", epochs=4)
    cfg.ranking.rerank_k = 50
    cfg.ranking.hard_negatives = 4  # of 16: retrieval-aware negatives
    r = train_ranking(cfg, progress=False)
    assert r.test["auc"] > 0.58 and r.valid["auc"] > 0.58  # chance is 0.5 (~0.01 spread over 300 users)
    two = r.two_stage
    assert set(two) == {"retrieval", "retrieval+ranking"}
    assert two["retrieval"]["hr@50"] == pytest.approx(two["retrieval+ranking"]["hr@50"])
    assert (r.run_dir / "checkpoint_best.pt").is_file() and (r.run_dir / "results.json").is_file()

    # listwise loss, best epoch by the pipeline's validation HR@10 on a fixed user sample
    cfg.name, cfg.train.epochs = "rank-listwise", 2
    cfg.ranking.loss, cfg.ranking.select_on, cfg.ranking.select_users = "listwise", "two_stage", 100
    cfg.ranking.valid_auc_users = 60  # per-epoch AUC on a fixed sample; the final valid AUC on every user
    from genrec.ranking_training import RankingTask

    seen, original = [], RankingTask.validate
    monkeypatch.setattr(RankingTask, "validate", lambda self, epoch: (seen.append(self.auc_users), original(self, epoch))[1])
    r = train_ranking(cfg, progress=False)
    sample = seen[0]
    assert len(sample) == 60 and all((s == sample).all() for s in seen) and len(np.unique(sample)) == 60
    rows = list(csv.DictReader(open(r.run_dir / "metrics.csv")))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]  # epoch 0: the untrained ranker (~ retrieval's order)
    best = max(rows, key=lambda row: float(row["val_two_stage_hr@10"]))
    assert r.best_epoch == int(best["epoch"])
    assert float(rows[2]["train_loss"]) < float(rows[1]["train_loss"]) and r.test["auc"] > 0.5  # it learns


@pytest.mark.slow
def test_an_anchored_ranker_fine_tunes_its_encoder_from_retrievals_order(tmp_path, tiny_synthetic_cfg, capsys):
    """ranking.anchor: epoch 0 (untrained head) reranks exactly like retrieval, with the encoder fine-tuned
    the frozen anchor keeps its weights, and the test report pairs the two arms user by user at each depth."""
    from genrec.checkpoint import load_checkpoint, ranking_model_from_checkpoint
    from genrec.ranking_training import train_ranking

    cfg = ranking_on_retrieval(tiny_synthetic_cfg, tmp_path, "rank-anchor", epochs=2)
    cfg.ranking.rerank_k, cfg.ranking.eval_depths = 50, [20]
    cfg.ranking.hard_negatives, cfg.ranking.loss, cfg.ranking.select_on = 4, "listwise", "two_stage"
    cfg.ranking.anchor, cfg.ranking.encoder_lr = True, 1e-3
    r = train_ranking(cfg, progress=False)
    rows = list(csv.DictReader(open(r.run_dir / "metrics.csv")))
    assert rows[0]["epoch"] == "0" and float(rows[0]["val_two_stage_hr@10"]) == float(rows[0]["val_retrieval_hr@10"])
    assert set(r.two_stage) == {"retrieval", "retrieval+ranking", "retrieval+ranking@20"}
    paired = json.loads((r.run_dir / "results.json").read_text())["two_stage_test_paired"]
    assert set(paired) == {"20", "50"}
    for depth in paired.values():
        hr = depth["hr@10"]
        assert hr["ci95_lo"] <= hr["delta"] <= hr["ci95_hi"]
        assert hr["delta"] == pytest.approx(hr["two_stage"] - hr["retrieval"])
    with np.load(r.run_dir / "two_stage_test_ranks.npz") as z:
        assert z["retrieval"].shape == z["reranked_20"].shape == z["reranked_50"].shape == z["users"].shape
        assert np.mean(z["reranked_50"] < 10) == pytest.approx(r.two_stage["retrieval+ranking"]["hr@10"])
    ranker = ranking_model_from_checkpoint(load_checkpoint(r.run_dir / "checkpoint_best.pt"))
    retrieval_state = load_checkpoint(cfg.ranking.retrieval_checkpoint)["model"]
    for name, w in ranker.anchor.encoder.state_dict().items():
        torch.testing.assert_close(w, retrieval_state[name])

    # genrec eval of the ranking checkpoint: the same two arms from the anchor it carries, at the depths asked
    from genrec.cli import main

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(r.run_dir / "checkpoint_best.pt"), "--depths", "20", "50", "--json",
                 "--set", "ranking.retrieval_checkpoint=/nonexistent.pt"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["two_stage"]["retrieval+ranking"]["hr@10"] == pytest.approx(r.two_stage["retrieval+ranking"]["hr@10"])
    assert report["paired"]["20"]["hr@10"]["delta"] == pytest.approx(paired["20"]["hr@10"]["delta"])
    assert main(["eval", "--checkpoint", str(r.run_dir / "checkpoint_best.pt"), "--depths", "0"]) == 2
    assert "--depths must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_ranking_resume_matches_uninterrupted(tmp_path, tiny_synthetic_cfg):
    """task: ranking runs through the shared loop, so an interrupted run resumes to the same weights,
    history and learning curve as one that was not interrupted."""
    from genrec.ranking_training import train_ranking

    cfg = tiny_synthetic_cfg
    cfg.out_dir, cfg.task = str(tmp_path), "ranking"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.patience = 2, 32, 1e-2, 0
    cfg.ranking.negatives, cfg.ranking.eval_negatives = 8, 16
    full, resumed, a, b = interrupted_then_resumed(train_ranking, cfg, 2)
    for k in a["ranking_head"]:
        torch.testing.assert_close(a["ranking_head"][k], b["ranking_head"][k])
    assert resumed.test == pytest.approx(full.test)
    assert (resumed.run_dir / "learning_curve.png").is_file() and (resumed.run_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_rating_aware_ranking_trains_on_rated_csv_and_round_trips(tmp_path, tiny_synthetic_cfg):
    """ranking.rating_input on a rated interactions CSV: the rating embedding learns, is saved with the
    checkpoint and restored; on data without ratings it is refused with a clear error."""
    from genrec.checkpoint import ranking_model_from_checkpoint
    from genrec.ranking_training import train_ranking

    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp,rating"]
    for u in range(60):
        for t, item in enumerate(rng.choice(40, 12, replace=False)):
            rows.append(f"{u},{item},{1000 * t + u},{1 + (item + u) % 5}")
    (tmp_path / "rated.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_synthetic_cfg
    cfg.out_dir, cfg.name, cfg.task = str(tmp_path), "rated", "ranking"
    cfg.data.format, cfg.data.path, cfg.data.rating_col = "csv", str(tmp_path / "rated.csv"), "rating"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 2, 16, 1e-2
    cfg.ranking.rating_input, cfg.ranking.cuts_per_user = True, 3
    r = train_ranking(cfg, progress=False)
    model = ranking_model_from_checkpoint(torch.load(r.run_dir / "checkpoint_best.pt", weights_only=False))
    emb = model.rating_emb.weight
    assert emb[0].abs().sum() == 0 and emb[1:].abs().sum() > 0  # level 0 (no rating) stays empty
    cfg.data.format, cfg.data.path, cfg.data.rating_col = "synthetic", None, None
    with pytest.raises(ValueError, match="rating_input needs ratings"):
        train_ranking(cfg, progress=False)
