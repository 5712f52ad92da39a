"""The scheduler side: the write protocol's coordinator, handlers and read locality."""
