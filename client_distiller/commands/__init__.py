"""The client's commands, one module each: each builds its typed config from the command line and
calls the library with it. ``cli.py`` registers them; ``setup.py`` holds the steps they share
(the offline benchmark, a local vendor with its teacher and key)."""
