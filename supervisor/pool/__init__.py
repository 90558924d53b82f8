"""Process management: the Arbiter and its worker pool, drain state, leases held for workers, strays."""
