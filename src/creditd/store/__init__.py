"""Storage: the hot store (balances and live reservations), the durable database, the bus."""
