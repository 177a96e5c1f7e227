"""The AMI side of callroute: protocol (no I/O), client, call tracker, call records."""
