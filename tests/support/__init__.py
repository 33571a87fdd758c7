"""Helpers the test folders share: ``client`` (a tiny offline benchmark, a tiny seeded CLIP, its
targets, small distill command lines), ``cluster`` (a local Redis Cluster and its vendors),
``hardening`` (raw sockets, gates, ledger sums) and ``imaging`` (seeded images as API items).
Fixtures among them are registered by the folder ``conftest.py`` files that use them."""
