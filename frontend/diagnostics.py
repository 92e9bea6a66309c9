"""What the importers tell the user about a model they cannot import.

Both frontends (torch.export and ONNX) report every op they lack in one error, grouped by
op with one example node and the model source line that produced it, so the user sees
the whole gap at once instead of one op per attempt.
"""

from __future__ import annotations

import re
from typing import Sequence

from llmc.ir import LlmcError


class UnsupportedOpsError(LlmcError):
    """The model uses ops that llmc cannot import."""


class UnsupportedPattern(LlmcError):
    """A known op (PyTorch or ONNX) used in a way its converter cannot express."""


def source_line(stack_trace: str | None) -> str | None:
    """'file.py:123 in fn: code' for the innermost model frame of a recorded stack trace (not torch's own)."""
    matches = list(re.finditer(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack_trace or ""))
    model_frames = [m for m in matches if "/torch/" not in m.group(1)]
    if not matches:
        return None
    path, line, function, code = (model_frames or matches)[-1].groups()
    return f"{path.rsplit('/', 1)[-1]}:{line} in {function}: {code.strip()}"


def unsupported_ops_error(framework: str, uses: Sequence[tuple[str, str, str | None]]) -> UnsupportedOpsError:
    """One error for every (op kind, node name, source line) the importer lacks a converter for."""
    kinds = sorted({kind for kind, _, _ in uses})
    lines = []
    for kind in kinds:
        nodes = [u for u in uses if u[0] == kind]
        _, name, source = nodes[0]
        more = f", and {len(nodes) - 1} more node(s)" if len(nodes) > 1 else ""
        lines.append(f"  {kind}: node {name}" + (f" at {source}" if source else "") + more)
    return UnsupportedOpsError(f"the model uses {len(kinds)} {framework} op(s) llmc cannot import yet: "
                               f"{', '.join(kinds)}.\n" + "\n".join(lines))
