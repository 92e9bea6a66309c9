"""The `llmc` command line: compile, inspect, run, chat, serve.

Every command turns llmc's errors into one paragraph on stderr and exit code 1; no
traceback reaches the user for a problem with their input.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from llmc.errors import LlmcError
from llmc.requirements import require_compiler

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="llmc: compile large language models ahead of time with Apache TVM, and run them.")


@functools.cache
def _stderr() -> Any:
    """rich's console on stderr, imported on first use: `llmc run` on a package starts without it."""
    from rich.console import Console

    return Console(stderr=True)


def _guarded(action: Callable[[], None]) -> None:
    try:
        action()
    except LlmcError as error:
        from rich.markup import escape

        # Escaped: messages hold brackets (`llmc[compiler]`, shapes) that are not markup.
        _stderr().print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _stderr().print("interrupted")
        raise typer.Exit(130) from None


def _threads(threads: Optional[int]) -> None:
    if threads is not None:
        from llmc.runtime.validation import at_least

        os.environ["TVM_NUM_THREADS"] = str(int(at_least("threads", threads, 1)))


@app.command()
def compile(model: str = typer.Argument(..., help="built-in name (smollm2-135m), GGUF file or Hugging Face folder"),
            output: Path = typer.Option(..., "--output", "-o", help="package directory to write"),
            target: str = typer.Option("cpu", "--target", "-t", help="comma-separated targets"),
            quant: str = typer.Option("auto", "--quant",
                                      help="weight format of the layers: auto (the checkpoint's own: a GGUF keeps "
                                           "each tensor's format, 16-bit weights stay 16-bit), f32, f16, q8 or q4"),
            quant_head: Optional[str] = typer.Option(None, "--quant-head",
                                                     help="weight format of the output head (default: q8 when "
                                                          "--quant is q8 or q4, else as --quant)"),
            kv_cache: str = typer.Option("f32", "--kv-cache",
                                         help="how the KV cache stores keys and values: f32, f16, q8 (8-bit, "
                                              "a scale per 32) or q4 (4-bit, a scale per 32, Hadamard-rotated)"),
            tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                                    help="folder or tokenizer.json to take the tokenizer from"),
            verbose: bool = typer.Option(False, "--verbose", "-v",
                                         help="say which rewrite rules fired in each function"),
            dump_ir: Optional[Path] = typer.Option(None, "--dump-ir",
                                                   help="write the IR after each step (import, each pass, the Relax "
                                                        "module per target) into this folder"),
            prune: Optional[str] = typer.Option(None, "--prune",
                                                help="remove the least important decoder layers, KV groups of heads "
                                                     "(per layer) and MLP channels (per layer), as counts or shares: "
                                                     "layers=3,heads=1,mlp=0.25"),
            calibration: Optional[Path] = typer.Option(None, "--calibration",
                                                       help="text file on which --prune measures importance "
                                                            "(default: a mixed text shipped with llmc)"),
            tensor_parallel: int = typer.Option(1, "--tensor-parallel",
                                                help="shard the model over N GPUs (Megatron-style; --target cuda, "
                                                     "whose all_reduce is NCCL's through TVM's disco)")) -> None:
    """Compile MODEL into a package directory."""
    def action() -> None:
        require_compiler("llmc compile")
        if verbose:
            import logging

            logging.basicConfig(format="%(name)s: %(message)s")
            logging.getLogger("llmc.passes").setLevel(logging.DEBUG)
        from llmc.compiler import compile_with_progress
        from llmc.passes.pipeline import PassOptions
        from llmc.passes.pruning_options import Pruning

        targets = [t.strip() for t in target.split(",") if t.strip()]
        if calibration is not None and prune is None:
            raise LlmcError("--calibration is the text --prune measures on; give --prune too")
        options = PassOptions(quant, quant_head, kv_cache, Pruning.parse(prune or ""), tensor_parallel)
        compile_with_progress(model, output, targets, options, tokenizer, dump_ir, calibration)
        _stderr().print(f"wrote {output}")
    _guarded(action)


@app.command()
def inspect(model: Optional[str] = typer.Argument(None, help="package directory or model"),
            ir: bool = typer.Option(False, "--ir", help="print the whole IR"),
            op: Optional[str] = typer.Option(None, "--op", help="print this IR op's signature and documentation")
            ) -> None:
    """Show a model's IR (functions, symbolic inputs, op counts, parameters), or what an IR op does (--op)."""
    def action() -> None:
        require_compiler("llmc inspect")
        from llmc.inspection import describe, describe_op, load_ir

        if op is not None:
            typer.echo(describe_op(op))
            return
        if model is None:
            raise LlmcError("llmc inspect needs a package or model to describe, or --op NAME")
        module = load_ir(model)
        typer.echo(describe(module, full_ir=ir))
    _guarded(action)


def _sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: Optional[int],
              stop: List[str], repetition_penalty: float, json_schema: Optional[Path] = None,
              grammar: Optional[Path] = None):
    from llmc.runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          stop=tuple(stop), repetition_penalty=repetition_penalty,
                          grammar=_grammar(json_schema, grammar))


def _grammar(json_schema: Optional[Path], grammar: Optional[Path]):
    """The grammar --json-schema or --grammar names (not both), or None."""
    from llmc.runtime.grammar import GrammarSpec

    if json_schema is not None and grammar is not None:
        raise LlmcError("give --json-schema or --grammar, not both")
    path = json_schema or grammar
    if path is None:
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise LlmcError(f"cannot read {path}: {error}") from None
    if grammar is not None:
        return GrammarSpec("grammar", text)
    try:
        return GrammarSpec.json_schema(json.loads(text))
    except json.JSONDecodeError as error:
        raise LlmcError(f"{path} is not JSON: {error}") from None


def _package(model: str, device: str) -> Path:
    """MODEL if it is a package, else MODEL compiled for `device` (an absent device is refused before compiling)."""
    from llmc.runtime.package import is_package

    if is_package(model):
        return Path(model)
    require_compiler(f"compiling {model} (not a compiled package)")
    from llmc.package_cache import package_for
    from llmc.runtime.devices import open_device
    from llmc.targets import get_target

    target = get_target(device)
    open_device(target.device_kind, target.runtime_library_files())
    return package_for(model, device)


def _speculation(text: Optional[str]):
    from llmc.runtime.speculation import Speculation

    return Speculation.parse(text) if text else None


def _engine(model: str, device: str, prefix_cache: bool = True, speculate: Optional[str] = None):
    from llmc.runtime.engine import load
    from llmc.runtime.model import CacheSettings

    speculation = _speculation(speculate)
    return load(_package(model, device), device=device, cache=CacheSettings(prefix_cache=prefix_cache),
                speculation=speculation)


NO_PREFIX_CACHE_HELP = "recompute every prompt instead of starting from cached KV pages of an earlier one"
SPECULATE_HELP = ("decode speculatively: ngram[:K] drafts up to K tokens (5) by prompt lookup, draft:PKG[:K] with a "
                  "smaller compiled model that has the same tokenizer; greedy output is unchanged")


@app.command()
def run(model: str = typer.Argument(..., help="package directory or model (compiled for --device and cached)"),
        prompt: str = typer.Argument(...),
        max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
        temperature: float = typer.Option(0.0, "--temperature", help="0 means greedy"),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k", help="0 means off"),
        repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        stop: List[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
        json_schema: Optional[Path] = typer.Option(None, "--json-schema",
                                                   help="JSON schema file: the output is JSON valid against it"),
        grammar: Optional[Path] = typer.Option(None, "--grammar", help="GBNF or Lark grammar file the output matches"),
        raw: bool = typer.Option(False, "--raw", help="send the prompt as is, without the chat template"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object with ids, text and logprobs"),
        device: str = typer.Option("cpu", "--device"),
        threads: Optional[int] = typer.Option(None, "--threads"),
        no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help=NO_PREFIX_CACHE_HELP),
        speculate: Optional[str] = typer.Option(None, "--speculate", help=SPECULATE_HELP)) -> None:
    """Generate text from PROMPT, streaming it as it is produced."""
    _end_when_done()

    def action() -> None:
        _threads(threads)
        params = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty, json_schema, grammar)
        engine = _engine(model, device, not no_prefix_cache, speculate)
        if as_json:
            result = engine.generate(prompt, params, chat=not raw)
            typer.echo(json.dumps(result.to_json()))
            return
        engine.generate(prompt, params, chat=not raw, on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        sys.stdout.write("\n")
    _guarded(action)


@app.command()
def chat(model: str = typer.Argument(..., help="package directory or model (compiled for --device and cached)"),
         max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n",
                                                  help="most tokens per answer (default: the rest of the context)"),
         temperature: float = typer.Option(0.0, "--temperature"),
         top_p: float = typer.Option(1.0, "--top-p"),
         seed: Optional[int] = typer.Option(None, "--seed"),
         system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
         device: str = typer.Option("cpu", "--device"),
         threads: Optional[int] = typer.Option(None, "--threads"),
         no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help=NO_PREFIX_CACHE_HELP),
         speculate: Optional[str] = typer.Option(None, "--speculate", help=SPECULATE_HELP)) -> None:
    """A multi-turn chat in the terminal (empty line or Ctrl-D to quit); each turn starts from the KV pages of
    the conversation so far."""
    _end_when_done()

    def action() -> None:
        _threads(threads)
        params = _sampling(1 if max_tokens is None else max_tokens, temperature, top_p, 0, seed, [], 1.0)
        engine = _engine(model, device, not no_prefix_cache, speculate)
        messages = [{"role": "system", "content": system}] if system else []
        _stderr().print("chat with the model; an empty line or Ctrl-D ends the chat")
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            if max_tokens is None:  # as the server answers a chat request without max_tokens
                params = dataclasses.replace(params, max_tokens=max(1, engine.context_length
                                                                    - len(engine.chat_prompt(messages))))
            result = engine.chat(messages, params, on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": result.text})
    _guarded(action)


@app.command()
def serve(model: str = typer.Argument(..., help="package directory or model (compiled for --device and cached)"),
          host: str = typer.Option("127.0.0.1", "--host"),
          port: int = typer.Option(8000, "--port"),
          model_name: Optional[str] = typer.Option(None, "--model-name",
                                                   help="the name clients pass as 'model' (default: MODEL as given)"),
          max_batch: int = typer.Option(16, "--max-batch", help="most sequences in one batch"),
          kv_tokens: Optional[int] = typer.Option(None, "--kv-tokens",
                                                  help="KV cache size in tokens, all sequences together (default: "
                                                       "the model's context or 1024 per batch sequence, if more)"),
          step_tokens: int = typer.Option(512, "--step-tokens",
                                          help="most tokens in one batch step (decodes plus prompt chunks)"),
          device: str = typer.Option("cpu", "--device"),
          threads: Optional[int] = typer.Option(None, "--threads"),
          no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help=NO_PREFIX_CACHE_HELP),
          speculate: Optional[str] = typer.Option(None, "--speculate", help=SPECULATE_HELP),
          max_body_mb: float = typer.Option(4.0, "--max-body-mb", help="largest request body accepted (413 above)"),
          body_timeout: float = typer.Option(30.0, "--body-timeout", help="seconds a client has to send its body"),
          shutdown_timeout: float = typer.Option(10.0, "--shutdown-timeout",
                                                 help="seconds open streams get to finish on SIGTERM or Ctrl-C")) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, batching concurrent requests."""
    def action() -> None:
        from llmc.runtime.engine import load
        from llmc.runtime.server import ServerLimits, serve as serve_http, serving_cache
        from llmc.runtime.validation import at_least, finite, port as check_port

        _threads(threads)
        check_port(port)
        for name, value in (("max_batch", max_batch), ("step_tokens", step_tokens), ("kv_tokens", 1 if kv_tokens is None else kv_tokens)):
            at_least(name, value, 1)
        limits = ServerLimits(max_body_bytes=int(at_least("max_body_mb", finite("max_body_mb", max_body_mb), 0.001)
                                                 * 2**20),
                              body_timeout_s=at_least("body_timeout", finite("body_timeout", body_timeout), 0.1),
                              shutdown_timeout_s=at_least("shutdown_timeout",
                                                          finite("shutdown_timeout", shutdown_timeout), 0))
        speculation = _speculation(speculate)
        package = _package(model, device)
        engine = load(package, device, serving_cache(package, max_batch, kv_tokens, step_tokens,
                                                     prefix_cache=not no_prefix_cache), speculation)
        serve_http(engine, model_name or model, host, port, limits)
    _guarded(action)


@app.command()
def bench(package: str = typer.Argument(..., help="package directory or model (compiled for --device and cached)"),
          new_tokens: int = typer.Option(128, "--new-tokens"),
          runs: int = typer.Option(3, "--runs"),
          device: str = typer.Option("cpu", "--device"),
          threads: Optional[int] = typer.Option(None, "--threads")) -> None:
    """llmc's prefill and decode speed on a short and a long prompt (medians)."""
    def action() -> None:
        from llmc.bench import LONG_PROMPT, SHORT_PROMPT
        from llmc.bench import bench as run_bench

        _threads(threads)
        engine = _engine(package, device)
        prompts = {"short": engine.encode(SHORT_PROMPT), "long": engine.encode(LONG_PROMPT)}
        for name, row in run_bench(engine.model, prompts, new_tokens, runs).items():
            typer.echo(f"{name:6s} prompt {row['prompt_tokens']:4d} tokens: prefill {row['prefill_tok_s']:8.1f} tok/s, "
                       f"decode {row['decode_tok_s']:7.2f} tok/s (median of {runs})")
    _guarded(action)


# Set by the commands whose process has nothing left to do once their output is written.
_end_at_once = False


def _end_when_done() -> None:
    global _end_at_once
    _end_at_once = True


def main() -> None:
    """The `llmc` program. After `run` or `chat`, the process ends as soon as its output is flushed:
    tearing down the interpreter's modules (numpy, tvm-ffi, jinja2, typer) would take 60 ms, a
    tenth of a short `llmc run`, and frees nothing that the system does not free at exit. Other
    commands (compile's worker pools, serve) end the ordinary way."""
    try:
        app()
    except SystemExit as done:
        if not _end_at_once:
            raise
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
