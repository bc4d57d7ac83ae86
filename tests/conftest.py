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


class ServeProcesses:
    """`genrec serve --config serve.yaml` subprocesses started in a test's directory."""

    def __init__(self):
        self.procs = []

    def start(self, cwd, config: str = "serve.yaml", wait_s: float = 60) -> int:
        """Starts one and returns the port it reports it listens on."""
        import subprocess
        import sys
        import time

        proc = subprocess.Popen([sys.executable, "-m", "genrec", "serve", "--config", config], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            line = proc.stdout.readline()
            if "serving on" in line:
                return int(line.rsplit(":", 1)[1])
        raise AssertionError("server never said where it listens")

    def stop(self) -> list[int]:
        """SIGTERM to every server still running -> their exit codes (0: a clean drain)."""
        import signal

        codes = []
        while self.procs:
            proc = self.procs.pop()
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(timeout=30))
        return codes


@pytest.fixture
def serve_processes():
    servers = ServeProcesses()
    yield servers
    servers.stop()
