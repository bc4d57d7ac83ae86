import csv
import json
import subprocess
import sys

import numpy as np
import pytest

TINY = ["--set", "data.max_len=20", "--set", "model.item_emb_dim=8", "--set", "model.dqk=8", "--set", "model.dv=8",
        "--set", "loss.num_negatives=16", "--set", "train.epochs=1", "--set", "eval.ks=[1, 10]"]


def genrec(*args, cwd):
    return subprocess.run([sys.executable, "-m", "genrec", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_tiny_udata(path) -> list[str]:
    """40 users x 8 distinct items each, in ML-100K's u.data layout; returns the lines."""
    lines = [f"{u}\t{i}\t{(u + i) % 5 + 1}\t{1000 * u + 10 * k}" for u in range(1, 41)
             for k, i in enumerate(np.random.default_rng(u).choice(60, size=8, replace=False) + 1)]
    path.write_text("\n".join(lines) + "\n")
    return lines


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_data(tmp_path):
    lines = write_tiny_udata(tmp_path / "u.data")
    r = genrec("data", "prepare", "--format", "ml-100k", "--input", "u.data", "--out", "prep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["users"] == 40
    (tmp_path / "cfg.yaml").write_text("name: t\nout_dir: runs\ndata:\n  format: prepared\n  path: prep\n")
    r = genrec("train", "--config", "cfg.yaml", "--no-progress", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| hstu |" in r.stdout and "| popularity |" in r.stdout
    ckpt = tmp_path / "runs" / "t" / "checkpoint_best.pt"
    assert ckpt.is_file() and (tmp_path / "runs" / "t" / "config.yaml").is_file()
    r = genrec("eval", "--checkpoint", str(ckpt), "--json", "--ranks-out", "ranks.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert set(table) == {"hstu", "popularity"}
    with open(tmp_path / "ranks.csv") as f:
        ranks = list(csv.DictReader(f))
    # one row per user, the raw ids of u.data, the last event as the target; the ranks give the printed metrics
    assert sorted(int(r["user"]) for r in ranks) == list(range(1, 41))
    last = {u: line.split("\t")[1] for u, line in ((int(x.split("\t")[0]), x) for x in lines)}
    assert all(r["target"] == last[int(r["user"])] for r in ranks)
    assert np.mean([int(r["rank"]) <= 10 for r in ranks]) == pytest.approx(table["hstu"]["hr@10"])
    assert np.mean([1 / int(r["rank"]) for r in ranks]) == pytest.approx(table["hstu"]["mrr"])
    r = genrec("embed", "--checkpoint", str(ckpt), "--out", "items.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    emb, ids = np.load(tmp_path / "items.npy"), np.load(tmp_path / "items.ids.npy")
    assert emb.shape == (len(ids), 8) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert json.loads((tmp_path / "items.json").read_text())["count"] == len(ids)


@pytest.mark.slow
def test_cli_reference_protocol_trains_without_validation_and_tests_the_final_weights(tmp_path):
    write_tiny_udata(tmp_path / "u.data")
    (tmp_path / "cfg.yaml").write_text("name: r\nout_dir: runs\ndata:\n  format: ml-100k\n  path: u.data\n")
    tiny = [*TINY, "--set", "train.epochs=2", "--set", "train.validation=false", "--set", "train.patience=1"]
    r = genrec("train", "--config", "cfg.yaml", "--no-progress", *tiny, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "r"
    assert "final weights, epoch 2" in r.stdout and "checkpoint: runs/r/checkpoint_last.pt" in r.stdout
    assert not (run / "checkpoint_best.pt").exists()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and not any(c.startswith("val_") for c in rows[0])  # no early stop, nothing validated
    results = json.loads((run / "results.json").read_text())
    assert results["valid"] == {} and results["checkpoint"] == "checkpoint_last.pt"
    r = genrec("eval", "--checkpoint", str(run / "checkpoint_last.pt"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hstu"] == pytest.approx(results["test"])
    r = genrec("eval", "--checkpoint", str(run / "checkpoint_last.pt"), "--stage", "valid", cwd=tmp_path)
    assert r.returncode == 2 and "train.validation: false" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "--config", "cfg.yaml", "--set", "model.heads=2"], "unknown config key in 'model': heads"),
    (["data", "prepare", "--format", "ml-1m", "--input", "ratings.dat", "--out", "out"], "ratings.dat:2: field 'rating' must be a number"),
    (["data", "prepare", "--format", "parquet-ish", "--input", "ratings.dat", "--out", "out"], "unknown data format 'parquet-ish'"),
    (["eval", "--checkpoint", "ratings.dat"], "not a readable genrec checkpoint"),
])
def test_cli_bad_input_exits_nonzero_with_a_clear_message(tmp_path, args, message):
    (tmp_path / "cfg.yaml").write_text("data:\n  format: synthetic\n")
    (tmp_path / "ratings.dat").write_text("1::2::3::4\n1::3::four::5\n")
    r = genrec(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow
def test_cli_index_lifecycle_build_verify_search_shard_merge(tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        "name: m\nout_dir: runs\ndata:\n  format: synthetic\n  synthetic:\n    num_users: 120\n    num_items: 150\n"
        "similarity:\n  type: mol\n  query_components: 2\n  item_components: 2\n  component_dim: 8\n"
        "  query_hidden: 16\n  gating_hidden: 8\nloss:\n  negatives: batch_shared\n")
    r = genrec("train", "--config", "cfg.yaml", "--no-progress", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = "runs/m/checkpoint_best.pt"
    assert genrec("embed", "--checkpoint", ckpt, "--out", "items.npy", cwd=tmp_path).returncode == 0
    r = genrec("build-index", "--name", "mol", "--checkpoint", ckpt, "--embeddings", "items.npy", "--no-progress",
               "--spec", "mol-hindexer:stage1=pca4,stage1_dtype=int8,kprime=40", "--eval-queries", "16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "indexes/mol/v1/manifest.json").read_text())
    assert manifest["count"] == 150 and manifest["encoder_checkpoint_sha256"] and 0 < manifest["eval"]["recall@10"] <= 1
    assert manifest["spec"]["kprime"] == 40 and manifest["packages"]["torch"]
    r = genrec("verify-index", "--name", "mol", cwd=tmp_path)
    assert r.returncode == 0 and "ok:" in r.stdout, r.stderr
    items = np.load(tmp_path / "items.npy")
    np.save(tmp_path / "train_q.npy", items[:60] + 0.1)
    np.save(tmp_path / "bad_q.npy", items[:60, :3])
    learned = ("build-index", "--name", "learned", "--checkpoint", ckpt, "--embeddings", "items.npy", "--no-progress",
               "--spec", "mol-hindexer:stage1=learned4,kprime=40", "--set", "distill_steps=20", "--eval-queries", "0")
    r = genrec(*learned, "--train-queries-file", "bad_q.npy", cwd=tmp_path)
    assert r.returncode == 2 and "training queries must be" in r.stderr and not (tmp_path / "indexes/learned").exists()
    r = genrec(*learned, "--train-queries-file", "train_q.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fit = json.loads((tmp_path / "indexes/learned/v1/manifest.json").read_text())["params"]["stage1_fit"]
    assert fit["query_source"] == "given" and fit["queries"] == 60 and fit["steps"] == 20
    r = genrec("search", "indexes/mol/v1", "--random", "2", "--k", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    ids = set(np.load(tmp_path / "items.ids.npy").tolist())
    assert len(rows) == 2 and all(len(x["ids"]) == 5 and set(x["ids"]) <= ids for x in rows)
    assert rows[0]["scores"] == sorted(rows[0]["scores"], reverse=True)

    for sid in range(2):
        r = genrec("build-index", "--name", "flat", "--version", "v3", "--embeddings", "items.npy", "--spec", "mips:factory=Flat",
                   "--shard-id", str(sid), "--num-shards", "2", "--no-progress", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = genrec("merge-index", "--name", "flat", "--version", "v3", "indexes/flat/v3.shard-0-of-2",
               "indexes/flat/v3.shard-1-of-2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genrec("search", "--name", "flat", "--random", "1", "--k", "3", cwd=tmp_path)
    assert r.returncode == 0 and len(json.loads(r.stdout)["ids"]) == 3, r.stderr

    r = genrec("bench", "retrieval", "--checkpoint", ckpt, "--items", "2000", "--recall-queries", "8", "--latency-queries", "2",
               "--repeats", "1", "--qps-batches", "8", "--systems", "mol-exact", "mol-topk-avg", "mol-hindexer", "faiss-flat",
               "--avg-budgets", "2000", "--kprimes", "100", "2000", "--stage1", "pca4:int8", "--stage1-select", "auto", "topk",
               "--cache-dtypes", "float32", "bfloat16", "--out-dir", "out", "--stem", "b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {(x["system"], x["params"]): x for x in csv.DictReader(open(tmp_path / "out/b.csv"))}
    assert float(rows[("mol-topk-avg", "budget=2000")]["recall@100_vs_mol"]) == 1.0  # full budget = exact
    assert float(rows[("mol-hindexer", "stage1=pca4,int8,kprime=2000")]["recall@100_vs_mol"]) == 1.0
    assert float(rows[("mol-hindexer", "stage1=pca4,int8,kprime=100")]["recall@100_vs_mol"]) < 1.0
    by_topk = rows[("mol-hindexer", "stage1=pca4,int8,kprime=100,select=topk")]  # same K' rows, another selection
    assert by_topk["recall@100_vs_mol"] == rows[("mol-hindexer", "stage1=pca4,int8,kprime=100")]["recall@100_vs_mol"]
    assert ("mol-hindexer", "stage1=pca4,int8,kprime=2000,select=topk") not in rows  # past the kernel's K' limit
    assert float(rows[("faiss-flat-ip", "Flat")]["recall@10_vs_mips"]) == 1.0
    bf16 = rows[("mol-hindexer", "stage1=pca4,int8,kprime=2000,cache=bfloat16")]  # a bf16 MoL cache, scored exactly
    assert float(bf16["bytes_per_item"]) < float(rows[("mol-hindexer", "stage1=pca4,int8,kprime=2000")]["bytes_per_item"])
    assert float(bf16["recall@100_vs_mol"]) >= 0.9
    assert (tmp_path / "out/b.png").stat().st_size > 0 and (tmp_path / "out/b.md").is_file()

    r = genrec("bench", "filters", "--checkpoint", ckpt, "--items", "2000", "--recall-queries", "8", "--latency-queries", "2",
               "--kprimes", "100", "--fractions", "0.02", "0.5", "--stage1", "pca4", "--out-dir", "out", "--stem", "f", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {(x["system"], x["fraction"]): x for x in csv.DictReader(open(tmp_path / "out/f.csv"))}
    assert float(rows[("mol-hindexer", "0.02")]["recall@k"]) == 1.0  # 40 allowed items < K': exact inside the search
    inside, post = (float(rows[(s, "0.5")]["recall@k"]) for s in ("mol-hindexer", "mol-hindexer post-filter"))
    assert inside >= post and float(rows[("mol-hindexer post-filter", "0.02")]["recall@k"]) < 1.0
    assert (tmp_path / "out/f.png").stat().st_size > 0

    codes = tmp_path / "indexes/mol/v1/stage1_codes.npy"
    data = bytearray(codes.read_bytes())
    data[-1] ^= 0xFF
    codes.write_bytes(bytes(data))
    r = genrec("verify-index", "indexes/mol/v1", cwd=tmp_path)
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr and "Traceback" not in r.stderr
    r = genrec("build-index", "--name", "x", "--embeddings", "items.npy", "--spec", "mol-hindexer", cwd=tmp_path)
    assert r.returncode == 2 and "needs --checkpoint" in r.stderr
    assert not (tmp_path / "indexes/x").exists()


@pytest.mark.slow
def test_cli_serve_and_query_over_grpc_then_shut_down_cleanly(tmp_path, serve_processes):
    import torch

    from genrec.index.mips import FlatMIPS
    from genrec.index.storage import save_index

    rng = np.random.default_rng(0)
    items = rng.standard_normal((200, 8)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)  # unit rows: each item is its own best match
    save_index(FlatMIPS(torch.from_numpy(items), np.arange(200) + 500), tmp_path / "idx", "items", "v1")
    (tmp_path / "serve.yaml").write_text(f"port: 0\nindexes: [{{name: items, path: {tmp_path / 'idx' / 'items'}}}]\n")
    np.save(tmp_path / "q.npy", items[:2])
    port = serve_processes.start(tmp_path)
    r = genrec("query", "--target", f"127.0.0.1:{port}", "--queries", "q.npy", "--k", "3", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["ids"][0] for row in rows] == [500, 501]
    bad = genrec("query", "--target", f"127.0.0.1:{port}", "--queries", "q.npy", "--k", "0", cwd=tmp_path)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    assert serve_processes.stop() == [0]


@pytest.mark.parametrize("harness", sorted(__import__("genrec.cli", fromlist=["BENCH_HARNESSES"]).BENCH_HARNESSES))
def test_every_bench_harness_is_reached_through_the_cli_and_writes_under_runs(harness, capsys):
    """`genrec bench <harness> --help` parses (no sys.path tricks, no script files) and the default
    --out-dir is under runs/, so a plain run never writes into the committed results."""
    from genrec.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", harness, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"genrec bench {harness}" in text and "runs/bench/" in text


def test_the_retrieval_bench_reuses_only_a_completed_run_of_the_same_config(tmp_path):
    """An interrupted run (no results.json) or one trained with another config is not reused as the
    benchmark's MoL model (it once reported recall@10 0.017 from a one-epoch leftover)."""
    from genrec.bench.retrieval import completed_run
    from genrec.config import RunConfig, dump_config

    cfg, run = RunConfig(name="m"), tmp_path / "m"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "checkpoint_best.pt").write_bytes(b"weights")
    assert completed_run(run, cfg) is None  # interrupted: no results.json
    (run / "results.json").write_text(json.dumps({"checkpoint": "checkpoint_best.pt"}))
    assert completed_run(run, cfg) == run / "checkpoint_best.pt"
    cfg.train.epochs = 3
    assert completed_run(run, cfg) is None  # another config


def test_the_retrieval_bench_records_which_mol_model_it_measured(tiny_synthetic_cfg, tmp_path):
    """Every retrieval figure names its MoL model (checkpoint, sha256, epoch): a recall change between two
    committed runs was once a changed harness model, not a changed search, and nothing said so."""
    from genrec.bench.retrieval import trained_mol
    from genrec.io import sha256_file
    from genrec.training import train

    cfg = tiny_synthetic_cfg
    cfg.similarity.type, cfg.loss.negatives, cfg.train.epochs = "mol", "batch_shared", 1
    cfg.out_dir, cfg.name = str(tmp_path), "mol"
    checkpoint = train(cfg, progress=False).checkpoint
    got = trained_mol(str(checkpoint), str(tmp_path))
    assert got.model["checkpoint"] == str(checkpoint) and got.model["source"] == "given"
    assert got.model["sha256"] == sha256_file(checkpoint)[:16] and got.model["epoch"] == 1
    assert got.items.shape[1] == cfg.model.item_emb_dim and np.isfinite(got.items).all()
    assert got.states.shape[1] == cfg.model.item_emb_dim


def test_the_gaussian_benchmark_corpus_keeps_the_catalogue_covariance_but_not_its_items():
    """bench retrieval --corpus gaussian: unit vectors whose direction statistics follow the trained items'
    (mean and covariance of the re-normalised draws close to the source's), and none a near-copy of one."""
    from genrec.bench.retrieval import gaussian_corpus

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((8, 8))
    source = rng.standard_normal((400, 8)) @ basis + 2.0
    source /= np.linalg.norm(source, axis=1, keepdims=True)
    drawn = gaussian_corpus(source, 20_000, np.random.default_rng(1))
    assert drawn.shape == (20_000, 8) and drawn.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(drawn, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(drawn.mean(0), source.mean(0), atol=0.03)
    np.testing.assert_allclose(np.cov(drawn, rowvar=False), np.cov(source, rowvar=False), atol=0.02)
    nearest = (drawn[:500] @ source.T).max(1)
    assert np.median(nearest) < 0.999  # not copies of trained items (noisy copies at noise 0.05 would be)
