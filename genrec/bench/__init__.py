"""Benchmark harnesses, each reached as ``genrec bench <name>`` (see ``genrec.cli.BENCH_HARNESSES``); shared
provenance, table and argparse helpers in ``report``, timing in ``timing``, load generators in ``load``."""
