"""Buying teacher outputs, in the order a request travels: the policy picks what to buy
(``policy``), the purchaser serves it from the content-addressed ``cache`` or reserves it in the
budget ``ledger`` and asks the vendor (``teacher_client``), and ``outputs`` adapts to the output
kind the key was sold. ``sentences`` is the unpaired text bank; ``local_vendor`` starts a vendor
on 127.0.0.1 for local runs."""
