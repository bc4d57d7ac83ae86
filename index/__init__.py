"""Offline indexes over item embeddings (MIPS and the MoL h-indexer). Lands with issue 5."""
