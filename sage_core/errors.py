"""Exceptions shared across sage_core."""


class CheckpointError(Exception):
    """A checkpoint (directory, config, index, shard or tensor) cannot be used as asked.

    The message always names the file, key or shape at fault.
    """
