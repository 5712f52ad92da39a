"""The write protocol: the write history, what a worker applied, announcing writes."""
