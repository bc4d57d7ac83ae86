#!/usr/bin/env bash
# Every GPU figure of the kernels and h-indexer issues in one device call, in priority order, each step
# under its own time limit so one slow or failing step cannot eat the rest. Logs and result tables land
# in $OUT (the device tool returns that folder). Runs under the GPU image's own python3 (torch, triton,
# numpy, pandas, matplotlib, pytest, hypothesis, tqdm, pyyaml): genrec is copied, not pip-installed.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh            # on a GPU machine
#   SMOKE=1 OUT=/tmp/gpu bash benchmarks/gpu_session.sh    # tiny sizes: checks the script itself on a CPU
#   STEPS="tests kernels" ...                               # a subset
#
# The serving steps need gRPC wheels for the image's Python 3.12 in ./.whl (ignored; carry it), fetched here with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grpcio==1.85.1 protobuf==7.35.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
set -u
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_session}
SMOKE=${SMOKE:-0}
STEPS=${STEPS:-"env tests kernels scale100m attention scale10m topk serving_tests serving flatmips"}
BUDGET_S=${BUDGET_S:-540}  # the whole session; each step gets min(its limit, what is left)
PY=${PY:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # steps run from $SITE
WORK=/tmp/gpu_session_work  # every log and table; packed into $OUT/gpu_results.tgz after each step
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

SITE=/tmp/genrec_site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r genrec "$SITE/genrec"
for p in encoders kernels retrieval index serving; do cp -r "$p" "$SITE/genrec/$p"; done
cp -r tests "$SITE/tests"
cp -r configs "$SITE/configs"  # harnesses that train a model first read configs/ beside the package
export PYTHONPATH="$SITE"

step() {  # step NAME LIMIT_S CMD...: runs CMD from $SITE, log in $WORK/NAME.log
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped, ${left}s left"; return; fi
  echo "== $name: limit ${limit}s, start $(date +%T)"
  (cd "$SITE" && timeout "$limit" "$@") > "$WORK/$name.log" 2>&1
  echo "== $name: rc=$? end $(date +%T)"
  tail -n 3 "$WORK/$name.log" | cut -c1-300
  tar czf "$OUT/gpu_results.tgz" -C "$WORK" .
}

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  KB="--items 4096 --batches 1 20 --kprimes 100 --backend triton --topk-batches --repeats 1"
  TK="--items 256 --dtypes int8 --batches 1 --kprimes 16 --topk-kprime 16 --backend triton --topk-batches 1 --skip mol --repeats 1"
  S100="--items 30000 --kprimes 500 --latency-queries 3 --qps-batches 8 --repeats 1 --device cpu --profile --train-epochs 1"
  S10="--items 20000 --kprimes 500 --latency-queries 3 --qps-batches 8 --repeats 1 --device cpu"
  ATA="--lengths 64 --tokens 256 --repeats 1"; ATB="--lengths 32 --tokens 128 --repeats 1"
  SV="--items 20000 --latency-queries 20 --seconds 1 --concurrency 1 8"
  FM="--items 20000 --batches 1 8 --threads 1 --repeats 3 --device cpu"
  TEST_DEVICE=cpu
else
  KB="--items 100000000 --peak-gbs 4800 --scan-configs default t4 t16 128x4:t8 256x8:t8 --topk-batches --mol-configs ieee bf16x3 bf16x3:c128:w8 --mol-cache-dtypes float32 bfloat16"
  TK="--items 10000000 --dtypes int8 --batches 1 --kprimes 10000 --topk-batches 1 --skip mol --repeats 3"
  S100="--items 100000000 --kprimes 10000 100000 --stage1 avg:int8 learned16:int8 --search-paths static --latency-queries 20 --repeats 2 --profile"
  S10="--items 10000000 --kprimes 10000 100000 --stage1 avg:int8 --latency-queries 20 --repeats 2"
  ATA="--lengths 1024 2048 4096 8192 --repeats 2 --triton-blocks 128x64 64x32"; ATB="--lengths 8192 --repeats 2"
  SV="--items 10000000 --seconds 4 --threads 8"
  FM="--items 10000000 --batches 1 8 32 128 --threads 1 --repeats 9 --device cuda"
  TEST_DEVICE=cuda
fi
BUNDLE="$REPO/runs/bench-retrieval/mol_bundle.pt"

step env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))'"
GENREC_TEST_DEVICE=$TEST_DEVICE step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  tests/test_index.py::test_flat_mips_searches_on_its_device_and_answers_as_on_the_host \
  tests/test_index.py::test_the_static_search_on_a_gpu_replays_a_captured_graph_equal_to_eager -rA
step kernels 120 $PY -m genrec bench kernels $KB --out-dir "$WORK" --stem kernels_gpu
step scale100m 150 $PY -m genrec bench retrieval-scale $S100 --bundle "$BUNDLE" --out-dir "$WORK" --stem retrieval_scale_100m_gpu
step attention 90 $PY -m genrec bench attention $ATA --out-dir "$WORK" --stem attention_gpu
step attention8k 50 $PY -m genrec bench attention $ATB --out-dir "$WORK" --stem attention_gpu_8k
step scale10m 60 $PY -m genrec bench retrieval-scale $S10 --bundle "$BUNDLE" --out-dir "$WORK" --stem retrieval_scale_10m_gpu
step topk 40 $PY -m genrec bench kernels $TK --out-dir "$WORK" --stem kernels_topk_gpu
# Serving from the GPU: the image's grpcio/protobuf are older than the committed generated code wants, so
# carry .whl (grpcio, protobuf, grpcio-health-checking, grpcio-reflection for cp312; the fetch command is at
# the top of this script) and name it in the run's carry list. Without .whl these steps fail at import.
if [ -d "$REPO/.whl" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/serving_site "$REPO"/.whl/*.whl \
    && SERVING_PATH="/tmp/serving_site:$SITE"
fi
PYTHONPATH=${SERVING_PATH:-$SITE} GENREC_TEST_DEVICE=$TEST_DEVICE step serving_tests 120 $PY -m pytest -q -p no:cacheprovider \
  tests/test_serving.py -k "places_its_index or search_by_user or rank_over_grpc" -rA
PYTHONPATH=${SERVING_PATH:-$SITE} step serving 150 $PY -m genrec bench serving $SV --device $TEST_DEVICE --out-dir "$WORK" --stem serving_gpu
# FlatMIPS on the GPU (group-max pre-selection, ~40 launches per chunk) vs plain mm + torch.topk per chunk
step flatmips 60 $PY -m genrec bench flat-mips $FM --out-dir "$WORK" --stem flat_mips_gpu
echo "== done in $(( $(date +%s) - T0 ))s"
ls -la "$WORK"
