"""Evaluate a saved Core ML ML Program in numpy, op by op, without the code that built it.

Linux cannot run `.mlpackage` files (`MLModel.predict` is macOS-only), so this is how an export
is proven here: read the package's Model.proto and its weight file back, then compute every
operation of a function with numpy. Only the file formats are shared with the builder (protobuf
schema from coremltools, the blob layout re-implemented in mil_storage.py), never its code; the
ops are in mil_ops.py and mil_tensor_ops.py.

    package = load_package("model.mlpackage")
    state = package.make_state()
    outputs = package.predict("decode", {"input_ids": ids, "position": pos}, state)

Precision `mode`:
- "declared": every op's outputs are rounded to the dtype the program declares for them, so an
  fp16 program computes each op in fp32 and rounds its result to fp16, as the device does.
- "fp16": every floating-point result is rounded to fp16, even where fp32 is declared (the
  Neural Engine computes in fp16 whatever the program says).
- "fp32": every floating-point result stays fp32, states included: the program's logic without
  its rounding, to tell a wrong graph from fp16 noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .mil_ops import OPS, OpArgs, StateRef
from .mil_storage import (
    MODEL_PATH_PREFIX,
    MilEvalError,
    TensorSpec,
    WeightFile,
    immediate_value,
    model_file,
    tensor_spec,
)
from .mil_tensor_ops import TENSOR_OPS

ALL_OPS = {**OPS, **TENSOR_OPS}

MODES = ("declared", "fp16", "fp32")
FP16_MAX = 65504.0
# The builder names each layer's residual adds layers_<i>_residual_<part>: the evaluator uses
# them to say in which layer an overflowing op sits.
LAYER_OP = re.compile(r"layers_(\d+)_residual_(attention|mlp)$")


@dataclass
class Fp16Range:
    """What the fp16-rounded results of one evaluation reached: the largest finite |value|
    (and where), and the first op whose result overflowed fp16 from finite inputs."""

    max_abs: float = 0.0
    max_where: str = ""
    overflow: str | None = None
    part: str = "the embedding"  # where the evaluation is: updated at each named residual add

    @property
    def headroom(self) -> float:
        """How many times larger the activations could grow before passing fp16's maximum."""
        return FP16_MAX / self.max_abs if self.max_abs else float("inf")

    def see(self, op_type: str, name: str, value: np.ndarray, inputs_finite) -> None:
        """Record one op's result before it is rounded to fp16; inputs_finite() says whether
        the op's inputs were all finite (asked only when the result is not)."""
        if value.size == 0:
            return
        magnitude = np.abs(value)
        finite = np.isfinite(magnitude)
        largest = float(magnitude[finite].max()) if finite.any() else 0.0
        where = f"op {op_type} ({name}) in {self.part}"
        if largest > self.max_abs:
            self.max_abs, self.max_where = largest, where
        # fp16 rounds values from 65,520 up to inf.
        overflowed = largest >= 65520.0 or not finite.all()
        if self.overflow is None and overflowed and inputs_finite():
            peak = largest if finite.all() else float("inf")
            self.overflow = f"{where}: its result reached |x| = {peak:.4g}, past fp16's 65,504"
        match = LAYER_OP.search(name)
        if match and match[2] == "attention":
            self.part = f"layer {match[1]} (its MLP)"
        elif match:
            self.part = f"layer {int(match[1]) + 1} (or the final norm and lm_head after the last)"


@dataclass
class Function:
    """One function of the program: declared inputs, its operations, the names it returns."""

    name: str
    inputs: dict[str, TensorSpec]
    operations: list
    outputs: list[str]
    output_specs: dict[str, TensorSpec] = field(default_factory=dict)


class MilPackage:
    """A saved `.mlpackage` read back: its functions, metadata and weights, ready to evaluate."""

    def __init__(self, path: str | Path):
        from coremltools.proto import Model_pb2

        self.path = Path(path)
        spec_file = model_file(self.path)
        self.spec = Model_pb2.Model()
        try:
            self.spec.ParseFromString(spec_file.read_bytes())
        except Exception as e:  # protobuf raises its own DecodeError
            raise MilEvalError(f"{spec_file}: not a Core ML model specification ({e}).") from e
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise MilEvalError(f"{self.path}: not an ML Program (neural networks unsupported).")
        self._model_dir = spec_file.parent
        self._weight_files: dict[str, WeightFile] = {}
        self._const_cache: dict = {}
        # fp16 results of every evaluation since the last reset (see Fp16Range).
        self.fp16_range = Fp16Range()
        self.functions = {name: self._read_function(name, f) for name, f in self._program_items()}
        self.metadata = dict(self.spec.description.metadata.userDefined)
        self.default_function = self.spec.description.defaultFunctionName or next(
            iter(self.functions)
        )

    def _program_items(self):
        return self.spec.mlProgram.functions.items()

    def _read_function(self, name: str, proto) -> Function:
        block = proto.block_specializations[proto.opset]
        inputs = {
            i.name: tensor_spec(i.type, f"function {name} input {i.name}") for i in proto.inputs
        }
        out_specs = {}
        for op in block.operations:
            if op.blocks:
                raise MilEvalError(
                    f"function {name}: op {op.type} has nested blocks (unsupported)."
                )
            for out in op.outputs:
                if out.name in block.outputs:
                    out_specs[out.name] = tensor_spec(out.type, f"output {out.name}")
        return Function(name, inputs, list(block.operations), list(block.outputs), out_specs)

    def state_specs(self) -> dict[str, TensorSpec]:
        """The states the package's functions declare, by name (shared by every function)."""
        return {n: s for f in self.functions.values() for n, s in f.inputs.items() if s.is_state}

    def make_state(self, mode: str = "declared") -> dict[str, np.ndarray]:
        """Zero-filled states; Core ML's `make_state()` starts them at zero too. In "fp32"
        mode states are kept in fp32, so the program's logic can be checked without rounding."""
        states = {}
        for name, spec in self.state_specs().items():
            dtype = np.float32 if mode == "fp32" and spec.dtype.kind == "f" else spec.dtype
            states[name] = np.zeros(spec.shape, dtype)
        return states

    def weight_file(self, file_name: str) -> WeightFile:
        if file_name not in self._weight_files:
            relative = file_name.removeprefix(MODEL_PATH_PREFIX)
            path = self._model_dir / relative
            if not path.exists():
                raise MilEvalError(f"{self.path}: weight file {relative} is missing.")
            self._weight_files[file_name] = WeightFile(path)
        return self._weight_files[file_name]

    def decode_value(self, value, where: str):
        """A proto Value (immediate or blob reference) as a numpy array (a str for strings)."""
        spec = tensor_spec(value.type, where)
        mil_dtype = value.type.tensorType.dataType
        kind = value.WhichOneof("value")
        if kind == "immediateValue":
            return immediate_value(value.immediateValue, spec, mil_dtype, where)
        if kind == "blobFileValue":
            blob = value.blobFileValue
            key = ("blob", blob.fileName, blob.offset, mil_dtype, spec.shape)
            if key not in self._const_cache:
                weights = self.weight_file(blob.fileName)
                self._const_cache[key] = weights.read(blob.offset, mil_dtype, spec.shape)
            return self._const_cache[key]
        raise MilEvalError(f"{where}: value without data.")

    def predict(
        self,
        function: str,
        inputs: dict[str, np.ndarray],
        state: dict[str, np.ndarray] | None = None,
        mode: str = "declared",
    ) -> dict[str, np.ndarray]:
        """Run `function` on `inputs`; `state` (from make_state) is read and updated in place."""
        if function not in self.functions:
            raise MilEvalError(
                f"{self.path}: no function {function!r}; it has {', '.join(self.functions)}."
            )
        if mode not in MODES:
            raise MilEvalError(f"mode {mode!r}: expected one of {', '.join(MODES)}.")
        return _Evaluator(self, self.functions[function], mode).run(inputs, state or {})


def load_package(path: str | Path) -> MilPackage:
    """Read a saved `.mlpackage` (or one function of it) back for evaluation."""
    return MilPackage(path)


class _Evaluator:
    """Runs one function once: an environment of named values, filled op by op."""

    def __init__(self, package: MilPackage, function: Function, mode: str):
        self.package = package
        self.function = function
        self.mode = mode
        self.env: dict[str, object] = {}

    def run(self, inputs: dict, state: dict) -> dict[str, np.ndarray]:
        fn = self.function
        for name, spec in fn.inputs.items():
            if spec.is_state:
                if name not in state:
                    raise MilEvalError(
                        f"function {fn.name} needs state {name!r}; pass make_state()."
                    )
                self.env[name] = StateRef(name, state)
            else:
                self.env[name] = self._check_input(name, spec, inputs)
        unknown = set(inputs) - set(fn.inputs)
        if unknown:
            raise MilEvalError(f"function {fn.name}: unknown inputs {', '.join(sorted(unknown))}.")
        for op in fn.operations:
            self._run_op(op)
        return {name: self._as_declared(name, self.env[name]) for name in fn.outputs}

    def _check_input(self, name: str, spec: TensorSpec, inputs: dict) -> np.ndarray:
        if name not in inputs:
            raise MilEvalError(f"function {self.function.name}: missing input {name!r}.")
        value = np.asarray(inputs[name])
        fixed = all(a == b for a, b in zip(value.shape, spec.shape) if b is not None)
        if value.ndim != len(spec.shape) or not fixed:
            raise MilEvalError(
                f"function {self.function.name}: input {name!r} has shape {value.shape}, "
                f"declared {spec.shape}."
            )
        return self._round(value, spec.dtype)

    def _round(self, value, dtype: np.dtype):
        """Round to the dtype the op's result is stored in. Floats are kept as fp32 arrays
        holding the rounded values, so the next op need not widen them again."""
        if not isinstance(value, np.ndarray) or dtype.kind == "O":
            return value
        if dtype.kind != "f":
            return value.astype(dtype, copy=False)
        if self.mode == "fp16" or (self.mode == "declared" and dtype.itemsize == 2):
            with np.errstate(over="ignore"):  # past 65,504 is inf, as on the device
                return value.astype(np.float16).astype(np.float32)
        return value.astype(np.float32, copy=False)

    def _rounds_to_fp16(self, dtype: np.dtype) -> bool:
        return dtype.kind == "f" and (
            self.mode == "fp16" or (self.mode == "declared" and dtype.itemsize == 2)
        )

    def _inputs_finite(self, op) -> bool:
        """Whether every named floating-point input of `op` is finite (an overflow is counted
        where it starts, not where it spreads)."""
        for argument in op.inputs.values():
            for binding in argument.arguments:
                value = (
                    self.env.get(binding.name) if binding.WhichOneof("binding") == "name" else None
                )
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    if not np.isfinite(value).all():
                        return False
        return True

    def _as_declared(self, name: str, value):
        spec = self.function.output_specs.get(name)
        if spec is None or not isinstance(value, np.ndarray) or spec.dtype.kind != "f":
            return value
        dtype = (
            np.float16 if self.mode == "fp16" else np.float32 if self.mode == "fp32" else spec.dtype
        )
        return value.astype(dtype)

    def _cache_key(self, op) -> tuple | None:
        """Weights (blob constants and their decompression) are computed once per package and
        mode, keyed by content: a multifunction package's functions share bit-identical
        weights, and so do we. Small immediate constants are cheap to decode every call."""
        if op.type.startswith("constexpr_"):
            parts = sorted(
                (k, a.SerializeToString(deterministic=True)) for k, a in op.inputs.items()
            )
            return (op.type, self.mode, tuple(parts))
        value = op.attributes["val"] if op.type == "const" else None
        if value is not None and value.WhichOneof("value") == "blobFileValue":
            return (op.type, self.mode, value.SerializeToString(deterministic=True))
        return None

    def _run_op(self, op) -> None:
        output = op.outputs[0].name if op.outputs else ""
        where = f"function {self.function.name}, op {op.type} ({output})"
        cache_key = self._cache_key(op)
        cached = self.package._const_cache.get(cache_key) if cache_key else None
        if cached is not None:
            self.env.update(zip([o.name for o in op.outputs], cached))
            return
        if op.type == "const":
            results = (self.package.decode_value(op.attributes["val"], where),)
        else:
            impl = ALL_OPS.get(op.type)
            if impl is None:
                raise MilEvalError(
                    f"{where}: the interpreter does not know MIL op {op.type!r}; "
                    "add it to converters/coreml/mil_ops.py or mil_tensor_ops.py."
                )
            args = OpArgs(self._resolve_inputs(op, where), where)
            try:
                # inf and NaN propagate silently, as on the device; Fp16Range reports them.
                with np.errstate(all="ignore"):
                    results = impl(args)
            except MilEvalError:
                raise
            except Exception as e:
                raise MilEvalError(f"{where}: {type(e).__name__}: {e}") from e
            results = results if isinstance(results, (tuple, list)) else (results,)
        if len(results) != len(op.outputs):
            raise MilEvalError(f"{where}: {len(results)} results for {len(op.outputs)} outputs.")
        produced = {}
        for out, value in zip(op.outputs, results):
            spec = tensor_spec(out.type, where)
            if self._rounds_to_fp16(spec.dtype) and cache_key is None:
                self.package.fp16_range.see(
                    op.type, out.name, np.asarray(value), lambda: self._inputs_finite(op)
                )
            value = self._round(np.asarray(value) if spec.dtype.kind != "O" else value, spec.dtype)
            shape = getattr(value, "shape", ())
            if spec.dtype.kind != "O" and (
                len(shape) != len(spec.shape)
                or any(d is not None and d != s for d, s in zip(spec.shape, shape))
            ):
                raise MilEvalError(
                    f"{where}: computed shape {shape} for {out.name}, declared {spec.shape}."
                )
            produced[out.name] = value
        self.env.update(produced)
        if cache_key is not None:
            self.package._const_cache[cache_key] = list(produced.values())

    def _resolve_inputs(self, op, where: str) -> dict[str, list]:
        resolved = {}
        for key, argument in op.inputs.items():
            values = []
            for binding in argument.arguments:
                if binding.WhichOneof("binding") == "name":
                    if binding.name not in self.env:
                        raise MilEvalError(
                            f"{where}: input {key} refers to unknown {binding.name}."
                        )
                    values.append(self.env[binding.name])
                else:
                    values.append(self.package.decode_value(binding.value, f"{where} {key}"))
            resolved[key] = values
        return resolved
