"""Retrieval recall/latency benchmark: the same harness as ``genrec bench retrieval`` (see
genrec/bench/retrieval.py for systems and protocol).

    python benchmarks/retrieval_bench.py --items 100000 [--threads 2]
"""

from genrec.bench.retrieval import main

if __name__ == "__main__":
    raise SystemExit(main())
