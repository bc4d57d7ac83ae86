"""genrec: retrieval engine for generative recommenders with learned similarity.

Data flows data -> encoders -> retrieval (similarity) -> index -> serving; each stage lives in the
top-level folder of the same name and is importable as ``genrec.<stage>``.
"""

__version__ = "0.1.0"
