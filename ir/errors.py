"""The IR's own error, in llmc's one exception family (`llmc.errors`, the only thing of
llmc that ir/ imports: the root every layer shares)."""

from llmc.errors import LlmcError


class IRError(LlmcError):
    """A graph that breaks the IR's rules (bad types, undefined values, cycles)."""


__all__ = ["IRError", "LlmcError"]
