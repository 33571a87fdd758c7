"""The vendor's tests: the API and its inputs, metering and the ledger (single Redis and Redis
Cluster), key administration and security, hardening against hostile clients, the protection
modes and the attacks they must withstand, the teacher. Fixtures: the shared vendor and Redis
ones of ``tests/conftest.py`` and the local Redis Cluster of :mod:`tests.support.cluster`."""

from tests.support.cluster import cluster_url, make_cluster_vendor, redis_cluster  # noqa: F401  (fixtures)
