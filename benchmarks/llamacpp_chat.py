"""llama.cpp doing what `llmc run PACKAGE PROMPT` does, in one process: import llama-cpp-python,
load a GGUF, answer PROMPT as one user message in the model's own chat template, greedily, with
the answer streamed to stdout as it is generated (benchmarks/startup.py times it).

    python benchmarks/llamacpp_chat.py MODEL.gguf PROMPT [MAX_TOKENS]
"""

from __future__ import annotations

import sys

from llama_cpp import Llama


def main() -> None:
    path, prompt = sys.argv[1], sys.argv[2]
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, verbose=False)
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                            stream=True):
        sys.stdout.write(chunk["choices"][0]["delta"].get("content") or "")
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
