"""Corpus readers, preprocessing, token-shard schema and the procedural `shapes` corpus."""
