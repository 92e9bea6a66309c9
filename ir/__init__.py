"""llmc's graph IR: typed values with symbolic dims, ops defined once, verifier, printer,
serialized form and a NumPy reference interpreter. It imports nothing else of llmc."""

from . import dims, ops
from .errors import IRError, LlmcError
from .graph import INPUT, PARAM, Graph, GraphBuilder, Module, Node, clone_with
from .interpreter import run, run_graph, run_sharded
from .printer import print_graph, print_module
from .reference_kv_cache import ReferenceKVCache
from .serialize import IR_VERSION, load_module, module_from_json, module_to_json, save_module
from .types import KVCacheType, TensorType
from .verifier import verify_graph, verify_module

__all__ = [
    "INPUT", "IR_VERSION", "PARAM", "Graph", "GraphBuilder", "IRError", "KVCacheType", "LlmcError", "Module", "Node",
    "ReferenceKVCache", "TensorType", "clone_with", "dims", "load_module", "module_from_json", "module_to_json", "ops",
    "print_graph", "print_module", "run", "run_graph", "run_sharded", "save_module", "verify_graph", "verify_module",
]
