"""The gateway: everything between the client and the engine."""
