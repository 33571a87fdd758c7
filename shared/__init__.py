"""The wire protocol that the vendor and the client both speak, and nothing else.

Kept dependency-light (pydantic + numpy) so a client can install it without the vendor's
server stack, and so both sides can never drift apart on a field name or an encoding.
"""
