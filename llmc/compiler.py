"""`llmc.compile`: checkpoint or PyTorch module in, package directory out.

It strings the stages together: load the checkpoint as a PyTorch model, export and
import it into the IR (an ONNX file is imported directly), save the tokenizer, measure
importance on a calibration text when pruning, run the pass pipeline, build one library
per target and write the package. Each stage reports
to a progress display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from llmc.frontend.checkpoint import config_beside, load_torch_model, model_config, resolve_model
from llmc.frontend.gguf_speedup import shared_gguf_readers
from llmc.frontend.gguf_weights import gguf_source_weights
from llmc.frontend.safetensors_weights import sixteen_bit_weights
from llmc.frontend.onnx_file import load_onnx
from llmc.frontend.onnx_importer import import_onnx
from llmc.frontend.tokenizer_export import has_tokenizer, resolve_tokenizer, save_tokenizer
from llmc.frontend.torch_export import MAX_EXPORT_LENGTH, import_torch_model
from llmc.ir import LlmcError, Module
from llmc.ir_dump import IRDump
from llmc.passes.kv_cache_lowering import MAX_WINDOW_PROBE
from llmc.passes.pipeline import PassOptions, passes, run_pipeline
from llmc.passes.pruning_importance import (CALIBRATION_TOKENS, DEFAULT_CALIBRATION, Importance,
                                            measure_importance)
from llmc.passes.pruning_options import PruningError
from llmc.runtime.tokenizer import Tokenizer
from llmc.codegen.package_writer import write_package, write_sharded_package
from llmc.codegen.staged_directory import staged_directory
from llmc.targets import get_target

from .progress import NoProgress, Reporter, Stages

DEFAULT_CONTEXT = 4096
# What transformers' configs call the position limit, most common first (GPT-2 and GPT-1: n_positions, MPT:
# max_seq_len, CTRL: n_ctx).
POSITION_LIMIT_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                        "max_sequence_length")


def context_length(config: dict[str, Any] | None) -> int:
    """The longest sequence the package accepts: the model's position limit, or its sliding
    window when that is shorter and longer than KV-cache lowering looks for in the mask
    (MAX_WINDOW_PROBE; within the window, full causal attention is exact)."""
    if not config:
        return DEFAULT_CONTEXT
    limits = [config.get(name) for name in POSITION_LIMIT_NAMES if config.get(name)]
    length = int(limits[0]) if limits else DEFAULT_CONTEXT
    window = _config_window(config)
    return min(length, window) if window and window > MAX_WINDOW_PROBE else length


def _config_window(config: dict[str, Any] | None) -> int | None:
    window = (config or {}).get("sliding_window")
    return int(window) if window and (config or {}).get("use_sliding_window", True) is not False else None


def _model_info(module: Module, name: str, config: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """What the package records about the model; `kind` stands in for a config's architecture."""
    logits = next(iter(module.functions.values())).outputs[0].type
    return {
        "name": name,
        "architecture": (config.get("architectures") or [kind])[0] if config else kind,
        "vocab_size": int(logits.shape[-1]),
        "context_length": context_length(config),
        "config": config,
    }


def _eos_ids(torch_model: Any, tokenizer_info: dict[str, Any] | None) -> list[int]:
    ids = list(tokenizer_info["eos_token_ids"]) if tokenizer_info else []
    generation = getattr(torch_model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None) if generation is not None else None
    for token in [extra] if isinstance(extra, int) else list(extra or []):
        if token not in ids:
            ids.append(token)
    return ids


def compile_model(model: Any, output: str | Path, targets: Sequence[str] = ("cpu",),
                  options: PassOptions = PassOptions(), progress: Reporter | None = None,
                  tokenizer: str | Path | None = None, dump_ir: str | Path | None = None,
                  calibration: str | Path | None = None) -> Path:
    """Compile `model` (a built-in name, a GGUF file, a Hugging Face folder, or a PyTorch
    causal LM) for `targets` into the package directory `output`. The tokenizer comes from
    `tokenizer` (a folder with tokenizer.json / tokenizer_config.json, or a model) when
    given, else from the checkpoint; a PyTorch module without one gets a package without a
    tokenizer (it then takes token ids). With `dump_ir`, the IR after each step is written
    there (llmc/ir_dump.py). Pruning (`options.prune`) measures importance on the text in the file
    `calibration` (default: passes/calibration.txt)."""
    target_objects = [get_target(t) for t in targets]
    if options.tensor_parallel > 1:
        for target in target_objects:
            if "all_reduce" in target.refused_ops:
                raise LlmcError(f"--tensor-parallel {options.tensor_parallel}: target {target.name} does not run "
                                f"{target.refused_ops['all_reduce']}")
    text = _calibration_text(calibration) if options.prune.requested else None
    with shared_gguf_readers(), staged_directory(Path(output)) as staging:
        _compile(model, staging, target_objects, options, progress or NoProgress(), tokenizer,
                 IRDump(Path(dump_ir) if dump_ir is not None else None), text)
    return Path(output)


def _calibration_text(path: str | Path | None) -> str:
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PruningError(f"cannot read the calibration text {path}: {error}") from None
    if not text.strip():
        raise PruningError(f"the calibration text {path} is empty")
    return text


def _importance(module: Module, text: str, tokenizer_file: Path | None, progress: Reporter) -> Importance:
    """Importance measured on `text` through the package's tokenizer."""
    if tokenizer_file is None:
        raise PruningError("pruning measures importance on a calibration text, so it needs the model's tokenizer; "
                           "this model has none (give one with --tokenizer)")
    tokens = Tokenizer(tokenizer_file).encode(text)[:CALIBRATION_TOKENS]
    progress.stage(f"measuring layers, heads and channels on {len(tokens)} calibration tokens")
    return measure_importance(module, tokens)


def _compile(model: Any, output: Path, target_objects: list, options: PassOptions, progress: Reporter,
             tokenizer: str | Path | None, dump: IRDump, calibration: str | None) -> None:
    """Compile into `output`, a fresh folder."""
    source = resolve_model(str(model)) if isinstance(model, (str, Path)) else None
    tokenizer_source = resolve_tokenizer(str(tokenizer)) if tokenizer is not None else source
    torch_model, sources = None, None
    if source is not None and source.kind == "onnx":
        progress.stage(f"loading {source.name}")
        onnx_model = load_onnx(source.path)
        progress.stage("importing the ONNX graph into llmc IR")
        module = import_onnx(onnx_model)
        info = _model_info(module, source.name, config_beside(source), "onnx")
    else:
        if source is not None:
            progress.stage(f"loading {source.name}")
            torch_model = load_torch_model(source)
            name = source.name
        else:
            torch_model, name = model, type(model).__name__
        if source is not None and "auto" in (options.quantization, options.head):
            sources = (gguf_source_weights(source.path, torch_model) if source.kind == "gguf"
                       else sixteen_bit_weights(source.folder, torch_model))
        progress.stage("exporting with torch.export and importing into llmc IR")
        config = model_config(torch_model) if hasattr(torch_model, "config") else None
        module = import_torch_model(torch_model, context_length(config) if config else MAX_EXPORT_LENGTH)
        info = _model_info(module, name, config, type(torch_model).__name__)
        if _config_window(config):
            module.metadata["config_window"] = _config_window(config)
    dump.module("imported", module)
    tokenizer_info = None
    if tokenizer_source is not None and has_tokenizer(tokenizer_source):
        progress.stage("saving the tokenizer")
        tokenizer_info = save_tokenizer(tokenizer_source, output)
    importance = None
    if calibration is not None:
        importance = _importance(module, calibration, output / tokenizer_info["file"] if tokenizer_info else None,
                                 progress)
    modules = run_pipeline(module, options, on_pass=progress.stage, sources=sources, after_pass=dump.module,
                           importance=importance)
    if tokenizer_info is not None:
        tokenizer_info["eos_token_ids"] = _eos_ids(torch_model, tokenizer_info)
    progress.stage("writing weights")
    def on_target(target: Any) -> None:
        progress.stage(f"compiling kernels for {target.name} ({target.description})")

    if len(modules) == 1:
        write_package(modules[0], target_objects, output, info, tokenizer_info, on_target, dump.relax)
    else:
        write_sharded_package(modules, target_objects, output, info, tokenizer_info, on_target, dump.relax)
    progress.finish()


def compile_with_progress(model: Any, output: str | Path, targets: Sequence[str] = ("cpu",),
                          options: PassOptions = PassOptions(), tokenizer: str | Path | None = None,
                          dump_ir: str | Path | None = None, calibration: str | Path | None = None) -> Path:
    """`compile_model` with a progress bar on stderr (the CLI's way)."""
    from_checkpoint = isinstance(model, (str, Path))
    stages = Stages("llmc compile", 2 + 2 * int(from_checkpoint) + int(options.prune.requested)
                    + len(passes(options)) + len(targets) * options.tensor_parallel)
    try:
        return compile_model(model, output, targets, options, stages, tokenizer, dump_ir, calibration)
    except BaseException:
        stages.progress.stop()
        raise

