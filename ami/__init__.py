"""The AMI side of callroute: protocol (no I/O), client, call tracker, call records, and
the calls in progress kept across a restart (parking)."""
