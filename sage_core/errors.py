"""Every exception sage_core raises on purpose, in one place; each message names what is at fault."""


class CheckpointError(Exception):
    """A checkpoint (directory, config, index, shard or tensor) cannot be used as asked.

    The message always names the file, key or shape at fault.
    """


class CorpusError(ValueError):
    """The corpus snapshot or a built corpus cannot be used (missing, altered, other recipe).

    Names the file at fault and the command that regenerates it.
    """


class TrustStateError(ValueError):
    """A saved trust file cannot be used (corrupt, truncated, other model). Names the file."""


class ClassifierStateError(ValueError):
    """A saved classifier file cannot be used (corrupt, truncated, wrong schema). Names the file."""


class DtypePolicyError(TypeError):
    """An op broke the dtype policy. Names the op, where it ran and the dtypes involved."""

    def __init__(self, op, where, inputs, output, activation, rule):
        self.op, self.where, self.rule = op, where, rule
        self.inputs, self.output, self.activation = tuple(inputs), output, activation
        ins = ", ".join(inputs) or "no float inputs"
        super().__init__(
            f"{op} in {where}: ({ins}) -> {output} breaks the dtype policy "
            f"(activation dtype {activation}): {rule}"
        )


class RunError(Exception):
    """A notebook run cannot start as asked (unknown notebook or parameter); nothing was executed."""
