"""Sequential user encoders (HSTU, SASRec) over jagged item histories."""

from genrec.encoders.model import SequentialEncoder

__all__ = ["SequentialEncoder"]
