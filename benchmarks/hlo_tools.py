"""Reading XLA's optimized HLO text: instructions, fused bodies and the source of each op.

``compiled.as_text()`` prints the scheduled module with the tables JAX fills with
the Python stack of every op (``FileNames``, ``FunctionNames``, ``FileLocations``,
``StackFrames``). With them each instruction can be traced to the model code that
made it (``BertSelfAttention.__call__`` -> ``dot_product_attention``), and, through
``op_name``, to the forward pass (``jvp(...)``), the backward pass
(``transpose(jvp(...))``) or neither (the optimizer update; work on frozen values alone).

Used by ``step_hlo.py`` (counts per layer) and ``profile_step.py`` (time per op group).
"""

from __future__ import annotations

import dataclasses
import linecache
import math
import re
from functools import cached_property
from pathlib import Path

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8\w*)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
REPO = str(Path(__file__).resolve().parents[1] / "peftjax")
# peftjax.models.common's attention functions, and lean_backward's (attention, attention_probs, _attention_*)
ATTENTION = ("dot_product_attention", "explicit_attention", "attention", "_attention_")
# Ops that move no data of their own.
FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (a tuple's elements summed)."""
    return sum(
        _ITEMSIZE.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(shape)
    )


@dataclasses.dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int
    parent: int  # 0: none


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    rest: str  # operands and attributes
    module: HloModule = dataclasses.field(repr=False)

    @cached_property
    def operands(self) -> list[str]:
        depth, end = 1, 0
        for end, char in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        return re.findall(r"%([\w.\-]+)", self.rest[:end])

    @property
    def calls(self) -> str | None:
        found = re.search(r"calls=%([\w.\-]+)", self.rest)
        return found.group(1) if found else None

    @property
    def op_name(self) -> str:
        found = re.search(r'op_name="([^"]*)"', self.rest)
        return found.group(1) if found else ""

    @property
    def stack(self) -> list[Frame]:
        """Innermost frame first. An op XLA made from several (its metadata then joins
        their names and drops the stack) takes the stack of its first operand that has one."""
        found = re.search(r"stack_frame_id=(\d+)", self.rest)
        if found:
            return self.module.stack(int(found.group(1)))
        for name in self.operands:
            producer = self.module.instruction(name)
            if producer is not None and producer.opcode not in FREE:
                return producer.stack
        return []

    @property
    def body(self) -> list[Instruction]:
        """The fused computation's instructions (empty for an unfused op)."""
        return self.module.computations.get(self.calls, []) if self.opcode == "fusion" else []

    @property
    def body_opcodes(self) -> set[str]:
        return {i.opcode for i in self.body} - FREE if self.body else {self.opcode}

    @property
    def library(self) -> str | None:
        """``__ynn_fusion`` / ``__xnn_fusion`` / ... for a fusion handed to a kernel library."""
        found = re.search(r'"kind":"(__\w+)"', self.rest)
        return found.group(1) if found else None

    @property
    def output_bytes(self) -> int:
        return shape_bytes(self.shape)

    @property
    def operand_bytes(self) -> int:
        return sum(self.module.shape_of(name) for name in self.operands)

    @property
    def phase(self) -> str:
        """forward (a jvp), backward (a transposed jvp) or outside (no derivative: the
        optimizer update, and forward work on frozen values alone, such as casts of frozen
        kernels or gathers from a frozen embedding)."""
        if "transpose(jvp" in self.op_name:
            return "backward"
        return "forward" if "jvp(" in self.op_name else "outside"

    @property
    def kind(self) -> str:
        """matmul, layout (a copy or transpose, alone or fused), reduce or elementwise."""
        ops = self.body_opcodes
        if "dot" in ops or "convolution" in ops:
            return "matmul"
        if ops & {"copy", "transpose"}:
            return "layout"
        if ops & {"reduce", "reduce-window"}:
            return "reduce"
        return "elementwise"


class HloModule:
    """One ``compiled.as_text()``: its computations and the stack-frame tables."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = ""
        current = None
        for line in text.splitlines():
            header = _COMPUTATION.match(line)
            if header:
                current = self.computations.setdefault(header.group(1), [])
                if line.startswith("ENTRY"):
                    self.entry = header.group(1)
                continue
            found = _INSTRUCTION.match(line)
            if found and current is not None:
                current.append(Instruction(*found.groups(), module=self))
        self._by_name = {i.name: i for body in self.computations.values() for i in body}
        self._frames = _frames(text)

    @property
    def instructions(self) -> list[Instruction]:
        """The entry computation's instructions that do work, in schedule order."""
        return [i for i in self.computations[self.entry] if i.opcode not in FREE]

    def instruction(self, name: str) -> Instruction | None:
        return self._by_name.get(name)

    def shape_of(self, name: str) -> int:
        found = self._by_name.get(name)
        return found.output_bytes if found else 0

    def stack(self, frame_id: int) -> list[Frame]:
        frames, seen = [], set()
        while frame_id and frame_id not in seen:
            seen.add(frame_id)
            frame = self._frames[frame_id]
            frames.append(frame)
            frame_id = frame.parent
        return frames


def _table(text: str, title: str) -> dict[int, str]:
    block = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    rows = {}
    for line in block.group(1).splitlines() if block else []:
        index, _, value = line.partition(" ")
        rows[int(index)] = value
    return rows


def _frames(text: str) -> dict[int, Frame]:
    """Frame id -> Frame. jaxlib 0.10's text printer writes each frame's parent one above
    its id (a root frame shows its own id, i.e. parent 0); read that way, every chain of
    the MiniLM step ends at the calling script's ``<module>`` frame, through the model's
    calls, which a wrong reading would not do."""
    files = {k: v.strip('"') for k, v in _table(text, "FileNames").items()}
    functions = {k: v.strip('"') for k, v in _table(text, "FunctionNames").items()}
    locations = {}
    for index, value in _table(text, "FileLocations").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        locations[index] = (functions[int(fields["function_name_id"])], files[int(fields["file_name_id"])],
                            int(fields["line"]))
    frames = {}
    for index, value in _table(text, "StackFrames").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        frames[index] = Frame(*locations[int(fields["file_location_id"])], parent=int(fields["parent_frame_id"]) - 1)
    return frames


def where(instruction: Instruction) -> tuple[str, str]:
    """(region, component) of an op. Region: ``layer``, ``embeddings``, ``optimizer``,
    ``head and loss`` or ``untraced`` (no stack: copies of arguments). In a layer the
    component is the layer's source line that made the op, then the innermost peftjax
    function below it and the library function that one called:
    ``h_btf = self.intermediate(x_btd) | BertIntermediate.__call__ / gelu``."""
    stack = instruction.stack
    if not stack:
        return "untraced", ""
    ours = [f for f in stack if f.file.startswith(REPO)]
    layer = next((f for f in ours if f.function.endswith("Layer.__call__")), None)
    if layer is None:
        if any("Embeddings" in f.function for f in ours):
            return "embeddings", ""
        if any("/optax/" in f.file and "/optax/losses/" not in f.file for f in stack):
            return "optimizer", ""
        return "head and loss", ""
    line = linecache.getline(layer.file, layer.line).strip()
    inner = ours[0].function
    library = stack[0].function if not stack[0].file.startswith(REPO) else ""
    return "layer", f"{line} | {inner}" + (f" / {library}" if library else "")
