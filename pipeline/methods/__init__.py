"""One file per method, each holding only what makes it different; see registry.py."""
