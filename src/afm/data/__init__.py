"""Data curation: the starter corpus, pipeline stages, deduplication, quality scoring, mixing, token shards."""
