from pathlib import Path

import pytest
import yaml

from genrec.config import ConfigError, RunConfig, dump_config, from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_shipped_configs_cover_the_published_setups():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "ml1m_sasrec", "ml1m_hstu", "ml1m_hstu_large", "ml20m_hstu", "books_hstu"} <= names
    large = load_config(CONFIGS[[p.stem for p in CONFIGS].index("ml1m_hstu_large")])
    assert (large.model.num_blocks, large.model.num_heads, large.model.dqk) == (8, 2, 25)


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_blocks: 3\n")
    cfg = load_config(p, ["model.num_blocks=5", "train.lr=0.01", "train.betas=[0.8, 0.9]", "data.path=x/y",
                          "train.stochastic_length_alpha=1.6", "eval.ks=[1, 5]"])
    assert cfg.model.num_blocks == 5 and cfg.train.lr == 0.01 and cfg.train.betas == (0.8, 0.9)
    assert cfg.data.path == "x/y" and cfg.train.stochastic_length_alpha == 1.6 and cfg.eval.ks == (1, 5)


@pytest.mark.parametrize("overrides,message", [
    (["model.num_blocksz=3"], r"unknown config key in 'model': num_blocksz"),
    (["model.num_blocks=three"], r"model.num_blocks: expected an integer, got 'three'"),
    (["model.encoder=bert"], r"model.encoder: 'bert' is not one of \['hstu', 'sasrec'\]"),
    (["train.betas=[0.9]"], r"train.betas: expected 2 values"),
    (["nonsense"], r"must look like key.path=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_defaults_reproduce_the_reference_recipe():
    cfg = RunConfig()
    assert cfg.loss.num_negatives == 128 and cfg.loss.temperature == 0.05
    assert cfg.train.lr == 1e-3 and cfg.train.betas == (0.9, 0.98) and cfg.train.weight_decay == 0.0
    assert cfg.train.batch_size == 128 and cfg.data.max_len == 200


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size: 0 is out of range"),
    ("train.epochs=0", "train.epochs: 0 is out of range"),
    ("model.item_emb_dim=0", "model.item_emb_dim: 0 is out of range"),
    ("eval.ks=[10, 0]", "eval.ks: 0 is out of range"),
    ("model.dropout=1.5", r"model.dropout: 1.5 is out of range \[0, 1\)"),
    ("data.kcore=-3", "data.kcore: -3 is out of range"),
    ("similarity.tau=0", r"similarity.tau: 0.0 is out of range \(0, inf\]"),
    ("ranking.hard_negatives=40", "more than negatives"),
    ("name=../../x", "must be one path component"),
    ("name=.hidden", "must be one path component"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, message, tmp_path):
    from genrec.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override, f"out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_every_shipped_config_is_in_range():
    from genrec.config import check_config

    for path in CONFIGS:
        assert check_config(load_config(path)) is not None
