"""The deployment kit cannot rot unnoticed: the Dockerfile's own install and start lines run in a fresh
virtualenv (these machines have no container daemon) and the server they start answers; the compose file
and the Prometheus config point at the ports the image's config opens."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, rest = full.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_compose_file_and_prometheus_config_match_the_image():
    steps = dockerfile_instructions(REPO / "Dockerfile")
    exposed = {int(p) for op, rest in steps if op == "EXPOSE" for p in rest.split()}
    serve = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    assert {serve["port"], serve["metrics_port"]} <= exposed and serve["host"] == "0.0.0.0"
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())["services"]
    assert f"{serve['port']}:{serve['port']}" in compose["genrec"]["ports"]
    assert any(v.endswith(":/app/indexes:ro") for v in compose["genrec"]["volumes"])
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"genrec:{serve['metrics_port']}"]
    assert (REPO / compose["prometheus"]["volumes"][0].split(":")[0]).is_file()


@pytest.mark.slow
def test_the_dockerfile_installs_and_starts_a_server_that_answers(tmp_path):
    """RUN lines in a fresh venv, with WORKDIR and COPY mapped into a temp root and ARG TORCH_INDEX empty
    (no registry beyond this machine's); then ENTRYPOINT + CMD (ports moved to free ones), health and
    a search over an index mounted where the image's config looks."""
    from genrec.index.mips import FlatMIPS
    from genrec.index.storage import save_index
    from genrec.serving.client import GenrecClient

    root, venv = tmp_path / "app", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    workdir, entrypoint, cmd = root, [], []
    for op, rest in dockerfile_instructions(REPO / "Dockerfile"):
        if op == "ARG":
            name = rest.split("=", 1)[0]
            env[name] = ""  # TORCH_INDEX: the local wheel index only
        elif op == "ENV":
            name, _, value = rest.partition("=")
            env[name] = value
        elif op == "WORKDIR":
            workdir = root / rest.lstrip("/").removeprefix("app").lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            *sources, dest = shlex.split(rest)
            for src in sources:  # docker's rules: into a directory when dest ends with / or sources are several
                target = workdir / dest / Path(src).name if dest.endswith("/") or len(sources) > 1 else workdir / dest
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / src, target)
        elif op == "RUN":
            done = subprocess.run(["bash", "-ec", rest], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"RUN {rest}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        elif op == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif op == "CMD":
            cmd = json.loads(rest)
    assert entrypoint and cmd, "the Dockerfile needs ENTRYPOINT and CMD in exec form"

    items = torch.nn.functional.normalize(torch.randn(100, 8), dim=-1)
    save_index(FlatMIPS(items, np.arange(100) + 7), workdir / "indexes", "default", "v1")
    port, metrics = free_port(), free_port()
    argv = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:], *cmd, "--set", f"port={port}",
            "--set", f"metrics_port={metrics}"]
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with GenrecClient(f"127.0.0.1:{port}") as c:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if c.health(timeout=2) == "SERVING":
                        break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                assert time.monotonic() < deadline, "the image's server did not report SERVING"
                time.sleep(0.5)
            scores, ids = c.search(items[:2].numpy(), 3)
        assert ids[:, 0].tolist() == [7, 8]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        assert 'genrec_index_items{device="cpu",index="default",version="v1"} 100.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
