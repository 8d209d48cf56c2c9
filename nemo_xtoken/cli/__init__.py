"""The ``xtoken`` command line; each layer registers its sub-commands in its own module."""
