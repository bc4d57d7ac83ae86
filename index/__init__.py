"""Offline indexes over item embeddings (flat and faiss MIPS, the MoL h-indexer): specs, builds, storage, shards."""
