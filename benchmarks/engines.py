"""The engines the CPU benchmark compares, each behind the same small interface.

An engine loads once and then times generations on request: prefill a prompt (timed to
the first new token) and decode greedily with end-of-sequence ignored. Each engine runs
in its own worker process (see bench_cpu.py), so peak memory is measured per engine
and thread pools never compete.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

N_THREADS = 2


class Engine(Protocol):
    def tokenize(self, text: str) -> list[int]: ...
    def generate(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]: ...


class LlmcEngine:
    def __init__(self, package: str):
        import llmc

        self.engine = llmc.load(package)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def generate(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        from llmc.bench import time_generation

        timing = time_generation(self.engine.model, ids, new_tokens)
        return timing.prefill_tok_s, timing.decode_tok_s, timing.output_ids


class LlamaCppEngine:
    def __init__(self, gguf: str):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_threads=N_THREADS, n_threads_batch=N_THREADS, n_ctx=2048, n_batch=512,
                         verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def generate(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        stamps, output = [], []
        start = time.perf_counter()
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            output.append(token)
            if len(output) == new_tokens:
                break
        return len(ids) / (stamps[0] - start), (new_tokens - 1) / (stamps[-1] - stamps[0]), output


class TorchEngine:
    def __init__(self, model: str):
        import torch

        from llmc.frontend.checkpoint import load_torch_model, resolve_model
        from llmc.frontend.tokenizer_export import save_tokenizer
        from tokenizers import Tokenizer

        torch.set_num_threads(N_THREADS)
        source = resolve_model(model)
        self.model = load_torch_model(source)
        directory = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llmc-bench-tokenizer-{os.getpid()}")
        save_tokenizer(source, __import__("pathlib").Path(directory))
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generate(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        stamps = Stamps()
        prompt = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, streamer=stamps, eos_token_id=None,
                                      pad_token_id=0)
        times = stamps.times  # [0]: the prompt, [1]: first new token, [-1]: last new token
        return (len(ids) / (times[1] - start), (new_tokens - 1) / (times[-1] - times[1]),
                out[0, len(ids):].tolist())


def make(kind: str, where: str) -> Engine:
    return {"llmc": LlmcEngine, "llama.cpp": LlamaCppEngine, "pytorch": TorchEngine}[kind](where)
