"""Checks on the repository itself rather than on running code: the docs stay true to the code
and the committed results, the Dockerfile and compose files are sound, and the house rules hold
(no private imports across modules, argparse only in the command layer). No fixtures needed."""
