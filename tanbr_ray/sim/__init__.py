"""Online simulation of an edge fleet: workload, fleet, slot loop, results (uses router and moe)."""
