"""Which bytes a cache key names: the key grammar and the identity of source stores."""
