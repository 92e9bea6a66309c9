"""The one exception family llmc raises for problems a user can act on.

Every layer (frontend, passes, codegen, runtime, CLI) raises `LlmcError` or a subclass
with a message written for the person running `llmc`: what was wrong, where, and what
to do. The CLI prints the message without a traceback. It lives at the top of the
package, outside ir/, so that the runtime can raise it without importing the compiler.
"""


class LlmcError(Exception):
    """A problem with the user's input or environment, explained in the message."""
