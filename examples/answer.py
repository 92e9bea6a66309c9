"""A small app that embeds llmc's runtime: it loads a compiled package once, then answers each
question given on the command line, streaming the answer as it is generated.

It needs only the runtime (`pip install llmc`), not the compiler:

    python examples/answer.py PACKAGE "What is 2+2?" "Name a primary colour."
"""

from __future__ import annotations

import sys

import llmc


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        engine = llmc.load(argv[0])
        for question in argv[1:]:
            print(f"> {question}")
            engine.generate(question, llmc.SamplingParams(max_tokens=64), chat=True,
                            on_text=lambda text: print(text, end="", flush=True))
            print()
    except llmc.LlmcError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
