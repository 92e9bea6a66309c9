"""The one exception family llmc raises for problems a user can act on.

Every layer (frontend, passes, codegen, runtime, CLI) raises `LlmcError` or a subclass
with a message written for the person running `llmc`: what was wrong, where, and what
to do. The CLI prints the message without a traceback.
"""


class LlmcError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class IRError(LlmcError):
    """A graph that breaks the IR's rules (bad types, undefined values, cycles)."""
