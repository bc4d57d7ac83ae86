"""Quality harnesses: runs leave per-user ranks behind, and paired comparisons read them as they read checkpoints."""

import csv

import numpy as np
import pytest
from genrec.bench import paired, train_quality

from genrec.retrieval.metrics import per_user_metric

SMALL = ["--set", "data.synthetic.num_users=150", "--set", "data.synthetic.num_items=120", "--set", "data.max_len=20",
         "--set", "model.item_emb_dim=8", "--set", "model.dqk=8", "--set", "model.dv=8", "--set", "loss.num_negatives=16"]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_quality_saves_ranks_that_pair_exactly_as_the_checkpoints_do(tmp_path):
    train_quality.main(["--datasets", "synthetic", "--epochs", "1", "--seeds", "1", "2", "--threads", "1",
                        "--work-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out"), *SMALL])
    ranks_dir = tmp_path / "out" / "ranks"
    names = sorted(p.name for p in ranks_dir.iterdir())
    assert names == [f"synthetic-{s}-s{seed}.ranks.npz" for s in ("hstu", "sasrec") for seed in (1, 2)]

    seeds = rows(tmp_path / "out" / "train_quality_seeds.csv")
    for row in (r for r in seeds if r["system"] != "popularity"):  # the table's metric is the ranks' mean
        seed, key, users, ranks, epoch = paired.load_ranks(ranks_dir / f"synthetic-{row['system']}-s{row['seed']}.ranks.npz")
        assert seed == int(row["seed"]) and epoch == 1 and "validation split: True" in key
        assert len(users) == len(ranks) == len(set(users.tolist())) > 0
        assert per_user_metric(ranks, "hr@10").mean() == pytest.approx(float(row["hr@10"]), abs=1e-9)

    ckpt = lambda s, seed: str(tmp_path / "runs" / f"synthetic-{s}-s{seed}" / "checkpoint_best.pt")  # noqa: E731
    common = ["--a-name", "hstu", "--b-name", "sasrec", "--resamples", "200", "--out-dir", str(tmp_path / "cmp")]
    paired.main([*common, "--stem", "from_ckpt", "--a", ckpt("hstu", 1), ckpt("hstu", 2),
                 "--b", ckpt("sasrec", 1), ckpt("sasrec", 2), "--save-ranks", str(tmp_path / "again")])
    from_files = lambda s, seed: str(ranks_dir / f"synthetic-{s}-s{seed}.ranks.npz")  # noqa: E731
    paired.main([*common, "--stem", "from_ranks", "--a", from_files("hstu", 1), from_files("hstu", 2),
                 "--b", from_files("sasrec", 1), ckpt("sasrec", 2)])  # files and checkpoints mix
    assert rows(tmp_path / "cmp" / "from_ckpt.csv") == rows(tmp_path / "cmp" / "from_ranks.csv")
    for name in names:
        a, b = paired.load_ranks(ranks_dir / name), paired.load_ranks(tmp_path / "again" / name)
        assert a[:2] == b[:2] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])

    with pytest.raises(SystemExit, match="do not pair"):  # seed 1 against seed 2
        paired.main([*common, "--stem", "bad", "--a", from_files("hstu", 1), "--b", from_files("sasrec", 2)])


def test_a_ranks_file_must_say_what_it_is(tmp_path):
    with pytest.raises(ValueError, match="ranks.npz"):
        paired.save_ranks(tmp_path / "x.npz", 1, "d", np.arange(3), np.arange(3), 1)
    path = paired.save_ranks(tmp_path / "x.ranks.npz", 7, "d (validation split: False)", np.arange(3), np.array([0, 5, 2]), 101)
    seed, key, users, ranks, epoch = paired.load_ranks(path)
    assert (seed, key, epoch) == (7, "d (validation split: False)", 101) and ranks.tolist() == [0, 5, 2]
    np.savez(tmp_path / "bad.ranks.npz", users=np.arange(3), ranks=np.arange(4), meta=np.array("{}"))
    with pytest.raises(ValueError, match="equal 1-d"):
        paired.load_ranks(tmp_path / "bad.ranks.npz")
