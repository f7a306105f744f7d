"""Shared training machinery that each method calls: config, distributed set-up, optimizer step,
checkpoints, logging and the offline loop. Functions and small objects, no base class."""
