"""Where this process sits (world: rank, world size, the launcher's environment) and every
collective (collectives)."""
