"""What every side shares: names, exceptions, settings, messages, event-loop hops."""
