"""Sequential user encoders (HSTU, SASRec) over jagged item histories, the ranking model, and the
history packer that turns raw histories into encoder input."""

from genrec.encoders.model import SequentialEncoder

__all__ = ["SequentialEncoder"]
