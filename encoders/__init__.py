"""Sequential user encoders (HSTU, SASRec) over jagged item histories.

``SequentialEncoder`` is imported lazily: kernels import ``genrec.kernels.jagged``, and the encoder
imports kernels, so an eager import here would be circular.
"""

__all__ = ["SequentialEncoder"]


def __getattr__(name: str):
    if name == "SequentialEncoder":
        from genrec.encoders.model import SequentialEncoder

        return SequentialEncoder
    raise AttributeError(name)
