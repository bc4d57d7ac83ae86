# Two entry points: `make demo` (set up + main job on built-in data) and `make test` (set up + tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: setup demo demo-card test test-fast bench gpu-bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: the pinned CPU wheel; a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	rm -rf runs/demo
	$(BIN)/genrec train --config configs/demo.yaml
	$(BIN)/genrec embed --checkpoint runs/demo/checkpoint_best.pt --out runs/demo/items.npy
	$(BIN)/genrec build-index --name demo --root runs/demo/indexes --embeddings runs/demo/items.npy \
	    --checkpoint runs/demo/checkpoint_best.pt --spec "mips:factory=HNSW32,ef_search=64" --no-progress
	$(BIN)/python -m genrec.demo --index runs/demo/indexes/demo --checkpoint runs/demo/checkpoint_best.pt

demo-card: setup
	rm -rf runs/demo-mol runs/demo-mol-ranking
	$(BIN)/genrec train --config configs/demo_mol.yaml
	$(BIN)/genrec train --config configs/demo_ranking.yaml --set name=demo-mol-ranking \
	    --set ranking.retrieval_checkpoint=runs/demo-mol/checkpoint_best.pt --set ranking.anchor=true \
	    --set ranking.encoder_lr=0.0001 --set train.epochs=2 --set ranking.select_users=300 --no-progress
	$(BIN)/genrec embed --checkpoint runs/demo-mol/checkpoint_best.pt --out runs/demo-mol/items.npy
	$(BIN)/genrec build-index --name demo --root runs/demo-mol/indexes --embeddings runs/demo-mol/items.npy \
	    --checkpoint runs/demo-mol/checkpoint_best.pt --spec "mol-hindexer:kprime=256" --no-progress
	$(BIN)/genrec build-index --name demo-mips --root runs/demo-mol/indexes --embeddings runs/demo-mol/items.npy \
	    --checkpoint runs/demo-mol/checkpoint_best.pt --spec "mips" --no-progress
	$(BIN)/python -m genrec.demo_card --index runs/demo-mol/indexes/demo --mips-index runs/demo-mol/indexes/demo-mips \
	    --checkpoint runs/demo-mol/checkpoint_best.pt --ranker runs/demo-mol-ranking/checkpoint_best.pt

test: setup
	$(BIN)/python -m pytest -q

# the inner loop: everything but the tests marked slow (training runs, subprocesses, DDP, soak)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# on a GPU machine: kernel tests compiled, kernel / attention / 10M-100M retrieval benchmarks (logs and
# tables packed into $(OUT)/gpu_results.tgz); uses the machine's own python3 with torch + triton
gpu-bench:
	OUT=$${OUT:-runs/gpu} bash benchmarks/gpu_session.sh

bench: setup
	$(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets synthetic
	$(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --mol --datasets synthetic
	$(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --mol --datasets ml100k --epochs 60 --threads 1 --stem mol_quality_ml100k --set model.num_blocks=2 --set model.dropout=0.2 --set model.input_dropout=0.2 --set train.lr=0.001
	$(BIN)/genrec bench epoch-speed --out-dir benchmarks/results/training
	$(BIN)/genrec bench train-step --steps 3 --out-dir benchmarks/results/training
	$(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets ml100k --seeds 42 43 44 --threads 1 --stem hstu_vs_sasrec_ml100k_3seeds --set model.num_blocks=2 --set model.dropout=0.2 --set model.input_dropout=0.2 --set train.lr=0.001
	$(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets synthetic --grid model.dropout+model.input_dropout=0.2,0.5 --grid train.lr=0.001,0.002 --seeds 42 43 44 --epochs 101 --set train.patience=10 --threads 1 --stem synthetic_sweep
	for s in hstu sasrec; do $(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets ml100k --systems $$s --grid model.dropout+model.input_dropout=0.2,0.5 --grid train.lr=0.001,0.002 --seeds 42 43 44 --threads 1 --set model.num_blocks=2 --stem ml100k_sweep_$$s; done
	for s in hstu sasrec; do $(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets ml100k --systems $$s --grid model.num_blocks=2,4 --seeds 42 43 44 --threads 1 --stem ml100k_depth_$$s; done
	for s in hstu sasrec; do $(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets ml100k --systems $$s --seeds 45 46 47 --threads 1 --stem ml100k_more_$$s; done
	$(BIN)/genrec bench paired --out-dir benchmarks/results/quality --stem ml100k_paired_hstu_sasrec --a-name hstu --b-name sasrec \
		--a $(foreach s,42 43 44,runs/bench/ml100k-hstu-g1-s$(s)/checkpoint_best.pt) $(foreach s,45 46 47,runs/bench/ml100k-hstu-s$(s)/checkpoint_best.pt) \
		--b $(foreach s,42 43 44,runs/bench/ml100k-sasrec-g1-s$(s)/checkpoint_best.pt) $(foreach s,45 46 47,runs/bench/ml100k-sasrec-s$(s)/checkpoint_best.pt)
	for s in hstu sasrec; do $(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets ml100k --systems $$s --seeds 42 43 44 --set train.patience=0 --threads 1 --work-dir runs/bench-e101 --stem ml100k_e101_$$s; done
	$(BIN)/genrec bench paired --out-dir benchmarks/results/quality --stem ml100k_paired_hstu_sasrec_epoch101 --a-name hstu --b-name sasrec \
		--a $(foreach s,42 43 44,runs/bench-e101/ml100k-hstu-s$(s)/checkpoint_last.pt) --b $(foreach s,42 43 44,runs/bench-e101/ml100k-sasrec-s$(s)/checkpoint_last.pt)
	for s in hstu sasrec; do $(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets ml100k --systems $$s --seeds 42 43 44 --set train.validation=false --threads 1 --work-dir runs/bench-ref --stem ml100k_ref_$$s; done
	$(BIN)/genrec bench paired --out-dir benchmarks/results/quality --stem ml100k_paired_hstu_sasrec_reference --a-name hstu --b-name sasrec \
		--a $(foreach s,42 43 44,runs/bench-ref/ml100k-hstu-s$(s)/checkpoint_last.pt) --b $(foreach s,42 43 44,runs/bench-ref/ml100k-sasrec-s$(s)/checkpoint_last.pt)
	for s in hstu sasrec; do $(BIN)/genrec bench train-quality --out-dir benchmarks/results/quality --datasets ml100k --systems $$s --grid model.num_blocks=8 --set model.num_heads=2 --set model.dqk=25 --set model.dv=25 --seeds 42 --threads 1 --stem ml100k_large_$$s; done
	$(BIN)/genrec bench retrieval --out-dir benchmarks/results/retrieval --items 100000
	$(BIN)/genrec bench retrieval --out-dir benchmarks/results/retrieval --items 1000000 --budgets 16 --repeats 1 --skip-qps mol-exact:128 mol-topk-per-embedding mol-combined
	$(BIN)/genrec bench serving --out-dir benchmarks/results/serving --repeats 3 --stem serving_200k
	$(BIN)/genrec bench serving --out-dir benchmarks/results/serving --items 1000000 --repeats 3 --stem serving_1m
	$(BIN)/genrec bench serving --out-dir benchmarks/results/serving --items 2000000 --concurrency 16 64 --repeats 3 --latency-queries 100 --stem serving_2m
	$(BIN)/genrec bench serving --out-dir benchmarks/results/serving --items 1000 20000 200000 --concurrency --stem serving_b1_sizes

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis *.egg-info
