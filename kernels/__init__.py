"""Hot ops behind one dispatch point each: a PyTorch reference (CPU path, test oracle) and,
where it pays, a Triton kernel chosen automatically on GPU."""

from genrec.kernels.dispatch import hstu_attention, resolve_backend

__all__ = ["hstu_attention", "resolve_backend"]
