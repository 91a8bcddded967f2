"""Can the TensorRT ONNX parser read this graph? A static check that needs no TensorRT and no GPU.

The supported-operator list is `tensorrt_supported_ops.txt` beside this file (copied from
onnx-tensorrt's docs/operators.md; its header names the source and TensorRT version). On top of
the op names, the restrictions of that table that headsteer's graphs could hit are checked here,
and every graph input/output must use a data type TensorRT accepts for network I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

OPS_FILE = Path(__file__).with_name("tensorrt_supported_ops.txt")

# ONNX TensorProto element types TensorRT accepts as network inputs/outputs (TensorRT 10).
# DOUBLE is only "cast down" inside the network; strings, complex and unsigned 16/32/64 are rejected.
IO_TYPES_OK = {
    1: "FLOAT",
    10: "FLOAT16",
    16: "BFLOAT16",
    6: "INT32",
    7: "INT64",
    3: "INT8",
    2: "UINT8",
    9: "BOOL",
}


@dataclass
class SupportedOps:
    ops: frozenset
    version: str
    opset_min: int
    opset_max: int


@dataclass
class CompatReport:
    problems: list = field(default_factory=list)
    ops: set = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems


@lru_cache(maxsize=1)
def supported_ops() -> SupportedOps:
    ops, version, opset_min, opset_max = set(), "unknown", 9, 24
    for line in OPS_FILE.read_text().splitlines():
        line = line.strip()
        if line.startswith("# version:"):
            version = line.split(":", 1)[1].strip()
        elif line.startswith("# opset-range:"):
            opset_min, opset_max = (int(v) for v in line.split(":", 1)[1].split())
        elif line and not line.startswith("#"):
            ops.add(line.split()[0])
    return SupportedOps(frozenset(ops), version, opset_min, opset_max)


def _attr(node, name, default=None):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def check_tensorrt_compat(model) -> CompatReport:
    """Check an onnx.ModelProto (or a path) against the TensorRT parser's support table."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = supported_ops()
    report = CompatReport()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not table.opset_min <= opset.version <= table.opset_max:
            report.problems.append(f"opset {opset.version} is outside TensorRT's range [{table.opset_min}, {table.opset_max}]")
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value)
    elem_types = {}
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        elem_types[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        elem_types[init.name] = init.data_type

    for node in graph.node:
        report.ops.add(node.op_type)
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            report.problems.append(f"{where} is in custom domain {node.domain!r}")
            continue
        if node.op_type not in table.ops:
            report.problems.append(f"{where}: operator not supported by the TensorRT ONNX parser ({table.version})")
            continue
        if node.op_type == "ScatterND" and _attr(node, "reduction", "none") != "none":
            report.problems.append(f"{where}: reduction={_attr(node, 'reduction')!r} (TensorRT supports only 'none')")
        if node.op_type == "TopK":
            if _attr(node, "sorted", 1) != 1:
                report.problems.append(f"{where}: sorted must be 1")
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                report.problems.append(f"{where}: K is not a build-time constant")
            elif int(k.reshape(-1)[0]) >= 3840:
                report.problems.append(f"{where}: K={int(k.reshape(-1)[0])} must be below 3840")
        if node.op_type in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            report.problems.append(f"{where}: axes are not constant")
        if node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            report.problems.append(f"{where}: axes are not an initializer")
        if node.op_type == "NonZero":
            elem = elem_types.get(node.input[0])
            if elem not in (None, 1, 10):  # FLOAT, FLOAT16 (None: unknown, checked by shape inference below)
                report.problems.append(f"{where}: input type {elem} (TensorRT's NonZero takes FP32/FP16)")
        if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            report.problems.append(f"{where}: only the first output Y is supported")

    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.name in constants:
                continue
            elem = value.type.tensor_type.elem_type
            if elem not in IO_TYPES_OK:
                name = onnx.TensorProto.DataType.Name(elem) if elem else "UNDEFINED"
                report.problems.append(f"graph {kind} {value.name!r} has type {name}, which TensorRT rejects for network I/O")
    return report


def infer_types(model):
    """Shape/type inference so the NonZero input check sees every intermediate type."""
    import onnx

    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


__all__ = ["CompatReport", "IO_TYPES_OK", "check_tensorrt_compat", "infer_types", "supported_ops"]
