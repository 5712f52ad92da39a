"""The worker cache: the read path, local state, peers and the files on disk."""
