"""The FastAGI side of callroute: the AGI protocol (no I/O), the server, the route handler."""
