"""Cluster coordination: etcd client, members, leases, membership."""
