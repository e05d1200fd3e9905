"""Errors shared by the layers, the trainer and the command line (no dependencies beyond the standard library)."""


class RunError(Exception):
    """A run that went wrong on its own (not because of its input): it diverged, or arms of a comparison failed.
    The command line prints its message on one line and exits with status 1."""
