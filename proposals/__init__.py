"""Selective-search proposals: computing, caching, running in parallel, recall."""
