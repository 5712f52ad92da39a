"""The global index: shards of key digests, their hosts, placement and the typed client."""
