"""Read an ONNX file and its external weight files, refusing what llmc cannot use.

A damaged file, a missing or short external data file, or an opset outside the range the
importer supports each get one error that names the file and says what to do, before
any conversion starts.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from llmc.ir import LlmcError

MIN_OPSET = 14
MAX_OPSET = onnx.defs.onnx_opset_version()
DEFAULT_DOMAINS = ("", "ai.onnx")


class OnnxFileError(LlmcError):
    """An ONNX file llmc cannot read: damaged, missing weights, or of an unsupported opset."""


def _external_files(model: onnx.ModelProto) -> dict[str, int]:
    """Each external data file the initializers name -> the bytes they need from it."""
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        needed[info["location"]] = max(needed.get(info["location"], 0), end)
    return needed


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The model in `path` with its weights loaded, or an error that says what is wrong with the file."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning-derived errors, ...
        raise OnnxFileError(f"{path} is not a readable ONNX model; the file is truncated or corrupt "
                              f"({type(error).__name__}: {error})") from None
    if not model.graph.node or not model.graph.output:
        raise OnnxFileError(f"{path} holds no ONNX graph (no nodes or no outputs); the file is truncated, "
                              "corrupt, or not an ONNX model")
    check_opset(model, path)
    for location, size in _external_files(model).items():
        data = path.parent / location
        if not data.is_file():
            raise OnnxFileError(f"{path} keeps weights in the external data file {location!r}, which is missing: "
                                  f"put {data.name} next to {path.name} (expected at {data})")
        if data.stat().st_size < size:
            raise OnnxFileError(f"the external data file {data} is truncated: it has {data.stat().st_size} bytes, "
                                  f"the model's weights need {size}")
    try:
        onnx.checker.check_model(str(path))
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as error:  # onnx raises ValidationError, OSError, ... on bad models
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxFileError(f"{path} is not a valid ONNX model: {first}") from None
    return model


def check_opset(model: onnx.ModelProto, path: Path | str = "the model") -> int:
    """The model's default-domain opset, if llmc supports it."""
    versions = {entry.domain: entry.version for entry in model.opset_import}
    version = next((versions[d] for d in DEFAULT_DOMAINS if d in versions), None)
    if version is None or not MIN_OPSET <= version <= MAX_OPSET:
        found = f"opset {version}" if version is not None else "no default-domain opset"
        raise OnnxFileError(f"{path} uses {found}; llmc imports ONNX opsets {MIN_OPSET} to {MAX_OPSET}. "
                              f"Re-export the model with an opset in that range (torch.onnx.export(..., "
                              f"opset_version=N)), or convert it with onnx.version_converter")
    return version
