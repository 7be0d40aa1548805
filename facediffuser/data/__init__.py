"""Preprocessing as a library, no Ray: the shard schema, the per-image stages and their models, shard I/O."""
