"""Work the daemon does besides serving requests: garbage collection, the dedup worker, the
sharer of copied trees, cold-start warming, and the supervisor they all run under."""
