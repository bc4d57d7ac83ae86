import json

import numpy as np
import pandas as pd
import pytest

from genrec.config import SyntheticConfig
from genrec.data.batches import eval_batches
from genrec.data.loaders import DataFormatError, load_interactions
from genrec.data.sequences import build_sequences, kcore_filter, leave_one_out, load_prepared, save_prepared
from genrec.data.synthetic import generate_synthetic

ROWS = [(1, 10, 5.0, 300), (1, 11, 3.0, 100), (2, 10, 4.0, 50), (1, 12, 1.0, 200), (2, 13, 2.0, 60)]


def write_fixture(tmp_path, fmt):
    if fmt == "ml-1m":
        p = tmp_path / "ratings.dat"
        p.write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ROWS))
    elif fmt == "ml-20m":
        p = tmp_path / "ratings.csv"
        p.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS))
    elif fmt == "ml-100k":
        p = tmp_path / "u.data"
        p.write_text("".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in ROWS))
    elif fmt == "recbole":
        p = tmp_path / "x.inter"
        p.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS))
    elif fmt == "csv":
        p = tmp_path / "events.csv"
        p.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS))
    elif fmt == "parquet":
        p = tmp_path / "events.parquet"
        pd.DataFrame(ROWS, columns=["user_id", "item_id", "rating", "timestamp"]).to_parquet(p)
    return p


@pytest.mark.parametrize("fmt", ["ml-1m", "ml-20m", "ml-100k", "recbole", "csv", "parquet"])
def test_each_loader_gives_chronological_sequences(tmp_path, fmt):
    path = write_fixture(tmp_path, fmt)
    inter = load_interactions(fmt, path, rating_col="rating")
    assert len(inter) == 5
    ds = build_sequences(inter)
    raw = lambda u: [ds.item_ids[i - 1] for i in ds.sequence(u)]  # noqa: E731
    assert ds.num_users == 2 and ds.num_items == 4
    assert [int(x) for x in raw(0)] == [11, 12, 10]  # user 1 sorted by time 100, 200, 300
    assert [int(x) for x in raw(1)] == [10, 13]
    assert ds.timestamps.tolist() == [100, 200, 300, 50, 60]
    assert ds.ratings.tolist() == [3.0, 1.0, 5.0, 4.0, 2.0]


def test_directory_path_finds_the_default_file(tmp_path):
    write_fixture(tmp_path, "ml-1m")
    assert len(load_interactions("ml-1m", tmp_path)) == 5


def test_sasrec_text_keeps_file_order(tmp_path):
    p = tmp_path / "seq.txt"
    p.write_text("1 5\n1 3\n2 3\n1 9\n")
    ds = build_sequences(load_interactions("sasrec", p))
    assert ds.timestamps is None
    assert [int(ds.item_ids[i - 1]) for i in ds.sequence(0)] == [5, 3, 9]


@pytest.mark.parametrize("fmt,content,expected", [
    ("ml-1m", "1::2::3::4\n1::x::3::5\n", r"ratings.dat:2: field 'item' must be an integer, got 'x'"),
    ("ml-1m", "1::2::3::4\n1::2::3\n", r"ratings.dat:2: expected 4 fields"),
    ("ml-1m", "1::2::3::4\n1::2::3::5::9\n", r"ratings.dat:2: expected 4 fields .* got 5"),
    ("ml-1m", "1::99999999999999999999::3::4\n", r"ratings.dat:1: field 'item' is outside the int64 range"),
    ("ml-100k", "1\t2\t3\t4\n\n1\t2\t3\t4\n", r"u.data:2: empty line"),
    ("ml-20m", "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,2,abc,4\n", r"ratings.csv:3: field 'rating' must be a number"),
    ("sasrec", "1 2\n3\n", r"seq.txt:2: expected 2 fields"),
    ("csv", "user_id,item_id,timestamp\n1,2,3\n1,2,yesterday-ish\n", r"events.csv:3: field 'timestamp' must be a number"),
])
def test_malformed_input_names_file_line_and_problem(tmp_path, fmt, content, expected):
    name = {"ml-1m": "ratings.dat", "ml-100k": "u.data", "ml-20m": "ratings.csv", "sasrec": "seq.txt", "csv": "events.csv"}[fmt]
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError, match=expected):
        load_interactions(fmt, tmp_path / name)


def test_empty_file_missing_column_and_unknown_format(tmp_path):
    (tmp_path / "u.data").write_text("")
    with pytest.raises(DataFormatError, match="u.data: file is empty"):
        load_interactions("ml-100k", tmp_path / "u.data")
    (tmp_path / "e.csv").write_text("user,item\n1,2\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['user_id', 'item_id'"):
        load_interactions("csv", tmp_path / "e.csv")
    with pytest.raises(DataFormatError, match="unknown data format 'netflix'"):
        load_interactions("netflix", tmp_path / "e.csv")
    with pytest.raises(DataFormatError, match="file not found"):
        load_interactions("ml-1m", tmp_path / "nope.dat")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFormatError, match="not a readable Parquet file"):
        load_interactions("parquet", tmp_path / "bad.parquet")


def test_kcore_until_stable_and_one_pass():
    # item 9 is seen once; removing it leaves user 3 with one event, which a second pass removes.
    users = np.array([1, 1, 2, 2, 3, 3, 1, 2])
    items = np.array([5, 6, 5, 6, 9, 5, 7, 7])
    stable = kcore_filter(users, items, k=2)
    one_pass = kcore_filter(users, items, k=2, passes=1)
    assert stable.tolist() == [True, True, True, True, False, False, True, True]
    assert one_pass.tolist() == [True, True, True, True, False, True, True, True]


def test_leave_one_out_split():
    inter = load_interactions.__globals__["Interactions"](
        users=np.array([1, 1, 1, 1, 2, 2]), items=np.array([1, 2, 3, 4, 1, 2]),
        timestamps=np.arange(6), ratings=None, source="t")
    ds = build_sequences(inter)
    split = leave_one_out(ds)
    assert split.eval_users.tolist() == [0]  # user 2 has 2 events: training only
    assert split.train_end.tolist() == [2, 6]
    assert split.validation


def test_leave_one_out_without_validation_holds_out_only_the_last_event():
    inter = load_interactions.__globals__["Interactions"](
        users=np.array([1, 1, 1, 1, 2, 2, 3]), items=np.array([1, 2, 3, 4, 1, 2, 5]),
        timestamps=np.arange(7), ratings=None, source="t")
    ds = build_sequences(inter)
    split = leave_one_out(ds, validation=False)
    assert split.eval_users.tolist() == [0, 1]  # 2 events are enough to test; user 3 (1 event) trains only
    assert split.train_end.tolist() == [3, 5, 7]
    assert [b.targets.tolist() for b in eval_batches(ds, split, "test", max_len=5, batch_size=8)] == [[4, 2]]
    with pytest.raises(ValueError, match="train.validation: false"):
        next(eval_batches(ds, split, "valid", max_len=5, batch_size=8))


def test_prepared_round_trip_and_atomicity(tmp_path):
    ds = build_sequences(generate_synthetic(SyntheticConfig(num_users=50, num_items=60, num_clusters=5, seed=1)))
    out = save_prepared(ds, tmp_path / "prep", meta={"source": "test"})
    back = load_prepared(out)
    for name in ("offsets", "items", "timestamps", "item_ids", "user_ids"):
        assert np.array_equal(getattr(ds, name), getattr(back, name))
    assert json.loads((out / "meta.json").read_text())["users"] == 50
    with pytest.raises(FileExistsError):
        save_prepared(ds, out)
    # a failure while writing leaves the old directory untouched and no partial one behind
    class Boom(dict):
        def __init__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        save_prepared(ds, tmp_path / "prep2", meta=Boom())
    assert not (tmp_path / "prep2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["prep"]
    with pytest.raises(DataFormatError, match="not a prepared dataset"):
        load_prepared(tmp_path)


def test_synthetic_has_structure_and_no_repeats():
    cfg = SyntheticConfig(num_users=200, num_items=300, num_clusters=10, seed=7)
    a, b = generate_synthetic(cfg), generate_synthetic(cfg)
    assert np.array_equal(a.items, b.items)  # seeded
    ds = build_sequences(a)
    for u in range(ds.num_users):
        seq = ds.sequence(u)
        assert len(set(seq.tolist())) == len(seq)
        assert np.all(np.diff(ds.timestamps[ds.offsets[u]:ds.offsets[u + 1]]) > 0)
    counts = np.sort(np.bincount(ds.items)[1:])[::-1]
    assert counts[: len(counts) // 10].sum() > 0.2 * counts.sum()  # popularity skew: top 10% items > 20% events


def _kept_dataset(tmp_path, monkeypatch, lines: str):
    """A gzipped SASRec-format file in a GENREC_DATA_DIR and a registry entry for it."""
    import gzip
    import hashlib

    from genrec.data.published import PublishedDataset

    kept = tmp_path / "kept"
    kept.mkdir()
    gz = kept / "tiny.sasrec.txt.gz"
    gz.write_bytes(gzip.compress(lines.encode()))
    monkeypatch.setenv("GENREC_DATA_DIR", str(kept))
    return gz, PublishedDataset("tiny", gz.name, hashlib.sha256(gz.read_bytes()).hexdigest(), "tiny.sasrec.txt",
                                "sasrec", "a test set")


def test_a_published_dataset_is_found_checked_and_decompressed_once(tmp_path, monkeypatch):
    from genrec.data.published import DatasetUnavailable, ensure_dataset

    gz, spec = _kept_dataset(tmp_path, monkeypatch, "1 5\n1 7\n2 5\n2 9\n")
    out = ensure_dataset("tiny", tmp_path / "data", {"tiny": spec})
    assert out == tmp_path / "data" / "tiny.sasrec.txt" and out.read_text() == "1 5\n1 7\n2 5\n2 9\n"
    gz.unlink()  # decompressed once: the kept file is not needed again
    assert ensure_dataset("tiny", tmp_path / "data", {"tiny": spec}) == out
    with pytest.raises(DatasetUnavailable, match=r"tiny.sasrec.txt.gz is in none of .*kept.*set GENREC_DATA_DIR"):
        ensure_dataset("tiny", tmp_path / "elsewhere", {"tiny": spec})
    gz.write_bytes(b"\x1f\x8b not the same file")
    with pytest.raises(DataFormatError, match="sha256 .* is not the expected"):
        ensure_dataset("tiny", tmp_path / "elsewhere", {"tiny": spec})
    assert not (tmp_path / "elsewhere" / "tiny.sasrec.txt").exists()
    with pytest.raises(DataFormatError, match="unknown dataset 'ml2m'"):
        ensure_dataset("ml2m", tmp_path / "data", {"tiny": spec})


def test_a_config_names_a_published_dataset_and_every_key_is_registered(tmp_path, monkeypatch):
    import typing

    import genrec.data.published as published
    from genrec.config import DataConfig, RunConfig
    from genrec.data.source import load_dataset

    hint = typing.get_type_hints(DataConfig)["dataset"]
    literal = next(a for a in typing.get_args(hint) if a is not type(None))
    assert set(typing.get_args(literal)) == set(published.PUBLISHED)  # the config accepts exactly the registry
    _, spec = _kept_dataset(tmp_path, monkeypatch, "1 5\n1 7\n1 8\n2 5\n2 9\n")
    monkeypatch.setitem(published.PUBLISHED, "ml1m", spec)
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig()
    cfg.data.dataset = "ml1m"
    ds = load_dataset(cfg.data)
    assert ds.num_users == 2 and ds.num_items == 4 and ds.timestamps is None
    assert (tmp_path / "data" / "tiny.sasrec.txt").is_file()


@pytest.mark.slow
def test_the_kept_ml1m_has_the_published_shape():
    from genrec.data.published import DatasetUnavailable
    from genrec.data.source import load_dataset
    from genrec.config import DataConfig

    try:
        ds = load_dataset(DataConfig(dataset="ml1m"))
    except DatasetUnavailable as e:
        pytest.skip(str(e))
    assert (ds.num_users, ds.num_items, len(ds.items)) == (6040, 3706, 1_000_209)
