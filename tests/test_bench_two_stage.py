"""genrec bench two-stage: per-run and seed-pooled paired differences from saved two-stage ranks."""

import json

import numpy as np
import pytest
import yaml

from genrec.bench.two_stage import main
from genrec.retrieval.metrics import per_user_metric


def fake_run(root, name, seed, retrieval, reranked):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}}))
    (run / "results.json").write_text(json.dumps({"best_epoch": 3}))
    np.savez(run / "two_stage_test_ranks.npz", users=np.arange(len(retrieval)), retrieval=retrieval,
             **{f"reranked_{d}": r for d, r in reranked.items()})
    return run


def test_runs_pool_by_arm_and_pair_user_by_user(tmp_path):
    rng = np.random.default_rng(0)
    retrieval = rng.integers(0, 40, 300)
    a = {d: np.where(rng.random(300) < 0.3, np.maximum(retrieval - 5, 0), retrieval) for d in (20, 50)}
    b = {d: np.where(rng.random(300) < 0.1, retrieval + 3, retrieval) for d in (20, 50)}
    runs = [fake_run(tmp_path, "rank-s1", 1, retrieval, a), fake_run(tmp_path, "rank-s2", 2, retrieval, b),
            fake_run(tmp_path, "other", 1, retrieval, {50: retrieval})]
    main([str(r) for r in runs] + ["--stem", "t", "--out-dir", str(tmp_path / "out"), "--resamples", "500"])
    rows = json.loads((tmp_path / "out" / "t.json").read_text())["rows"]
    assert (tmp_path / "out" / "t.png").stat().st_size > 0
    pooled = [r for r in rows if r["arm"] == "rank" and r["seeds"] == "1 2" and r["depth"] == 50]
    assert len(pooled) == 1 and len(rows) == 2 + 2 + 1 + 2  # per run and depth, then the pooled arm per depth
    want = np.mean([per_user_metric(a[50], "hr@10"), per_user_metric(b[50], "hr@10")], axis=0).mean()
    assert pooled[0]["two_stage_hr@10"] == pytest.approx(want)
    assert pooled[0]["delta_hr@10"] == pytest.approx(want - per_user_metric(retrieval, "hr@10").mean())
    assert pooled[0]["ci95_lo_hr@10"] <= pooled[0]["delta_hr@10"] <= pooled[0]["ci95_hi_hr@10"]
    same = [r for r in rows if r["arm"] == "other"][0]
    assert same["delta_ndcg@10"] == 0.0 and same["ratio_hr@10"] == 1.0
    single = [r for r in rows if r["arm"] == "rank" and r["seeds"] == "1" and r["depth"] == 20][0]
    assert single["delta_mrr"] > 0  # arm a moves targets up


def test_runs_on_different_users_are_not_pooled(tmp_path):
    r1 = fake_run(tmp_path, "x-s1", 1, np.arange(10), {10: np.arange(10)})
    r2 = fake_run(tmp_path, "x-s2", 2, np.arange(12), {10: np.arange(12)})
    with pytest.raises(ValueError, match="different users"):
        main([str(r1), str(r2), "--stem", "t", "--out-dir", str(tmp_path / "out"), "--resamples", "100"])
