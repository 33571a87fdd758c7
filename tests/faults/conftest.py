"""Fault injection across the boundary: a vendor or client killed mid-request, Redis lost or
failing, replicas racing for one quota. Each test asserts the money invariants (nobody charged for
an answer not received, nothing served unpaid, no ledger entry lost) after the fault."""

from tests.support.client import tiny_bench  # noqa: F401  (fixtures)
