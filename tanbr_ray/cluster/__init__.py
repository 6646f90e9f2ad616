"""Ray layer: decision actors (leader + standby), mergers, Serve edge deployments, ingress, driver and
cluster-config checks."""
