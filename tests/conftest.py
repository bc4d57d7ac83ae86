import os

import pytest
import torch

# GENREC_TEST_DEVICE=cuda runs the kernel tests on a GPU (compiled kernels); otherwise the interpreter
if os.environ.get("GENREC_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_synthetic_cfg():
    from genrec.config import RunConfig, SyntheticConfig

    cfg = RunConfig()
    cfg.data.max_len = 30
    cfg.data.synthetic = SyntheticConfig(num_users=300, num_items=200, num_clusters=10, mean_length=20, seed=3)
    cfg.model.item_emb_dim = 16
    cfg.model.dqk = cfg.model.dv = 16
    cfg.loss.num_negatives = 32
    cfg.train.epochs = 2
    cfg.train.batch_size = 64
    cfg.eval.ks = (1, 10, 50)
    return cfg
