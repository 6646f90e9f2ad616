"""Ray layer: router actor, Serve edge deployments, ingress, driver and cluster-config checks."""
