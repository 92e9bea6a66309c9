"""One benchmark engine in its own process: load it, then answer timing requests read
from stdin (one JSON object per line) with one JSON line each on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import make  # noqa: E402


def main() -> None:
    kind, where = sys.argv[1], sys.argv[2]
    engine = make(kind, where)
    print(json.dumps({"ready": kind}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        ids = engine.tokenize(request["prompt"])
        prefill, decode, output = engine.generate(ids, request["new_tokens"])
        print(json.dumps({"prompt_tokens": len(ids), "prefill": prefill, "decode": decode, "first_ids": output[:16]}),
              flush=True)


if __name__ == "__main__":
    main()
