"""The quantized (and float16) tensors of a GGUF file as the file stores them, for `--quant auto`.

transformers loads a GGUF by dequantizing every tensor to float; that float model is
what llmc exports and imports, so the graph path stays the one path. This module reads
the same file's quantized tensors again, as blocks (ir/ggml_formats.py), and names them
after the model's parameters, so that the quantize pass can run each weight in its own
format instead of the float copy.

Names come from transformers' own GGUF-to-Hugging-Face map. Where transformers reorders
a tensor while loading it (llama.cpp stores Llama's q and k projections with their rows
permuted for its rotary layout), the reordering is found by passing row numbers through
transformers' own tensor processor, and applied to the blocks: rows are whole runs of
blocks, so the codes are unchanged. Every weight read this way is checked against the
float tensor transformers made from it, value for value, before it is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmc.ir import LlmcError
from llmc.ir.ggml_formats import FORMATS
from llmc.ir.quant_formats import Quantized, dequantize
from llmc.ir.types import numpy_dtype
from llmc.passes.quantize import SIXTEEN_BIT_FORMATS, SourceWeight

FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_source_weights(path: Path, model: Any) -> dict[str, SourceWeight]:
    """Parameter name -> the file's blocks of that weight (or its 16-bit values), for every quantized, F16 or
    BF16 2-D tensor of the GGUF at `path` that the model uses. A tensor in a quantized format llmc does not
    read is an error naming it."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, read_field)

    reader = gguf.GGUFReader(str(path))
    unknown = [(t.name, t.tensor_type.name) for t in reader.tensors
               if t.tensor_type.name not in FORMATS and t.tensor_type.name not in FLOAT_TYPES]
    if unknown:
        listed = ", ".join(f"{name} ({kind})" for name, kind in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise LlmcError(f"{path} stores tensors in formats llmc does not read: {listed}{more}. llmc keeps "
                        f"{', '.join(FORMATS)}, F16 and BF16 tensors as they are; to convert the "
                        "dequantized weights instead, compile with `llmc compile MODEL --quant f32` (or f16, q8, "
                        "q4) and run the package")
    config = model.config.to_dict()
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    parameters = model.state_dict()
    aliases = _aliases(parameters)
    sources: dict[str, SourceWeight] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind == "F32" or len(tensor.shape) != 2:
            continue
        cols, rows = (int(n) for n in tensor.shape)
        found = _row_order(processor, tensor.name, rows, names, config)
        if found is None:
            continue
        name, order = found
        if kind in SIXTEEN_BIT_FORMATS:  # gguf-py gives F16 as float16, BF16 as its bytes
            data = np.asarray(tensor.data).view(numpy_dtype(SIXTEEN_BIT_FORMATS[kind])).reshape(rows, cols)[order]
            values = data.astype(np.float32)
        else:
            q = FORMATS[kind].to_quantized(np.asarray(tensor.data), cols)
            data = Quantized(q.codes[order], q.scales[order], None if q.mins is None else q.mins[order])
            values = dequantize(data.codes, data.scales, data.mins, data.bits)
        if not np.array_equal(values, parameters[name].detach().numpy()):
            raise LlmcError(f"llmc's reading of {tensor.name} ({kind}) in {path} differs from the weights "
                            f"transformers loaded for {name}; this is a defect in llmc, please report it")
        for alias in aliases[name]:
            sources[alias] = SourceWeight(kind, data)
    return sources


def _aliases(parameters: dict[str, Any]) -> dict[str, list[str]]:
    """Each parameter name -> every name of the same tensor (tied embeddings have two)."""
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in parameters.items():
        by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    return {name: group for group in by_storage.values() for name in group}


def _row_order(processor: Any, gguf_name: str, rows: int, names: dict[str, str], config: dict
               ) -> tuple[str, np.ndarray] | None:
    """The parameter a GGUF tensor loads into, and which file row each of its rows is; None when transformers
    does more to the tensor than reorder its rows (then its float form is used)."""
    probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    try:
        result = processor.process(weights=probe, name=gguf_name, tensor_key_mapping=names,
                                   parsed_parameters={"config": config, "tensors": {}})
    except Exception:  # noqa: BLE001 - a processor that cannot take a column of row numbers does not only reorder
        return None
    order = np.asarray(result.weights)
    if result.name not in names or order.shape != (rows, 1) or not np.array_equal(np.sort(order[:, 0]), probe[:, 0]):
        return None
    return names[result.name], order[:, 0].astype(np.int64)
