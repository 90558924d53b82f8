"""The queue side of a worker: clients, the consumer loop, leases, settling, poison notes."""
