"""The remote experts' answers one micro-batch used, recorded so that another peer can replay the micro-batch.

A trainer's trunk gradient depends on what its experts answered: outputs in the forward pass and the gradients with
respect to their inputs in the backward pass. Neither can be asked again later (the experts keep training), so the
trainer records both; a checker replays them (`ReplayDispatcher`) and recomputes everything else itself. A replay
that routes tokens differently from the record (another expert set, other token counts) raises `TranscriptMismatch`:
the sender's claim does not describe a computation of this model on this batch.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from dragon_swarm.moe.handler import FP16_TARGET_EXPONENT
from dragon_swarm.state.checkpoint import safetensors_metadata


class TranscriptMismatch(ValueError):
    """A replay asked the transcript something the recorded micro-batch never did."""


@dataclass
class ExpertCall:
    """One `dispatch` of one MoE layer invocation."""

    layer: int
    outputs: dict[int, torch.Tensor]  # expert index -> output [n, d_model]
    input_grads: dict[int, torch.Tensor] = field(default_factory=dict)  # filled by the backward pass


@dataclass
class ExpertTranscript:
    alive: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, bool mask) per `alive_mask` call
    calls: list[ExpertCall] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """safetensors bytes (never pickle): what a sender serves and a checker hashes."""
        tensors: dict[str, torch.Tensor] = {}
        for n, (_, mask) in enumerate(self.alive):
            tensors[f"alive.{n}"] = mask.to(torch.uint8).contiguous()
        exponents: dict[str, int] = {}
        for n, call in enumerate(self.calls):
            for kind, values in (("out", call.outputs), ("grad", call.input_grads)):
                for index, value in values.items():
                    name = f"call.{n}.{kind}.{index}"
                    tensors[name], exponent = _compact(value)
                    if exponent:
                        exponents[name] = exponent
        layers = {"alive": [layer for layer, _ in self.alive], "calls": [call.layer for call in self.calls]}
        return save_tensors(tensors, metadata={"layers": json.dumps(layers), "exponents": json.dumps(exponents)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ExpertTranscript":
        """Raises ValueError on anything that is not a transcript."""
        try:
            tensors = load_tensors(data)
            metadata = safetensors_metadata(data)
            layers = json.loads(metadata["layers"])
            exponents = {str(k): int(v) for k, v in json.loads(metadata.get("exponents", "{}")).items()}
            if any(abs(e) > 64 for e in exponents.values()):
                raise ValueError("scale exponent out of range")
            alive_layers, call_layers = [int(x) for x in layers["alive"]], [int(x) for x in layers["calls"]]
        except Exception as e:  # safetensors raises its own error types for truncated or foreign bytes
            raise ValueError(f"not an expert transcript: {type(e).__name__}: {e}") from None
        transcript = cls()
        for n, layer in enumerate(alive_layers):
            mask = tensors.get(f"alive.{n}")
            if mask is None:
                raise ValueError(f"transcript lacks alive mask {n}")
            transcript.alive.append((layer, mask.to(torch.bool)))
        calls = [ExpertCall(layer, {}) for layer in call_layers]
        for name, tensor in tensors.items():
            parts = name.split(".")
            if parts[0] != "call":
                continue
            if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit() or int(parts[1]) >= len(calls):
                raise ValueError(f"unexpected tensor {name!r} in a transcript")
            call = calls[int(parts[1])]
            tensor = _expand(tensor, exponents.get(name, 0))  # stored compact, used as float32
            if parts[2] == "out":
                call.outputs[int(parts[3])] = tensor
            elif parts[2] == "grad":
                call.input_grads[int(parts[3])] = tensor
            else:
                raise ValueError(f"unexpected tensor {name!r} in a transcript")
        transcript.calls = calls
        return transcript


def _compact(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(float16 values, power-of-two exponent) when that loses nothing, else (the tensor, 0). Expert answers cross the
    wire as float16 scaled by a power of two (`moe.handler.encode_tensor`), so a transcript of such a swarm takes half
    the bytes, bit-exact; the value is `values * 2**-exponent`."""
    tensor = tensor.detach().contiguous()
    amax = float(tensor.abs().max()) if tensor.numel() else 0.0
    if tensor.dtype != torch.float32 or not math.isfinite(amax):
        return tensor, 0
    exponent = FP16_TARGET_EXPONENT - math.frexp(amax)[1] if amax > 0 else 0
    scaled = tensor * (2.0**exponent)
    half = scaled.half()
    return (half, exponent) if torch.equal(half.float(), scaled) else (tensor, 0)


def _expand(tensor: torch.Tensor, exponent: int) -> torch.Tensor:
    return tensor.float() * (2.0**-exponent) if tensor.dtype == torch.float16 else tensor


class _GradTap(torch.autograd.Function):
    """Identity whose backward keeps the gradient that reaches an expert's inputs."""

    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, call: ExpertCall, index: int) -> torch.Tensor:
        ctx.call, ctx.index = call, index
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        ctx.call.input_grads[ctx.index] = grad.detach().clone()
        return grad, None, None


class RecordingDispatcher:
    """Wraps the trainer's dispatcher; `begin()` starts a micro-batch's transcript, `take()` returns it after the
    backward pass. Every other attribute is the wrapped dispatcher's. Each thread records its own transcript, so
    micro-batches computed at once (`training.pipeline`) never mix their calls."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.num_layers, self.num_experts = inner.num_layers, inner.num_experts
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:  # only called for attributes this wrapper does not have
        return getattr(self.__dict__["inner"], name)

    @property
    def _transcript(self) -> ExpertTranscript:
        transcript = getattr(self._local, "transcript", None)
        if transcript is None:
            transcript = self._local.transcript = ExpertTranscript()
        return transcript

    def begin(self) -> None:
        self._local.transcript = ExpertTranscript()

    def take(self) -> ExpertTranscript:
        transcript, self._local.transcript = self._transcript, ExpertTranscript()
        return transcript

    def alive_mask(self, layer: int) -> torch.Tensor:
        mask = torch.as_tensor(self.inner.alive_mask(layer), dtype=torch.bool)
        self._transcript.alive.append((layer, mask.detach().cpu().clone()))
        return mask

    def dispatch(self, layer: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        call = ExpertCall(layer, {})
        tapped = {i: _GradTap.apply(t, call, i) if t.requires_grad else t for i, t in inputs.items()}
        outputs = self.inner.dispatch(layer, tapped)
        call.outputs = {i: out.detach().cpu().clone() for i, out in outputs.items()}
        self._transcript.calls.append(call)
        return outputs


class _Replay(torch.autograd.Function):
    """Gives the recorded output forward and the recorded input gradient backward."""

    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, output: torch.Tensor, input_grad: torch.Tensor | None) -> torch.Tensor:
        ctx.input_grad, ctx.shape = input_grad, tokens.shape
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if ctx.input_grad is None:  # no gradient reached this expert's inputs when the sender ran it
            return torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device), None, None
        return ctx.input_grad.to(grad.device, grad.dtype), None, None


class ReplayDispatcher:
    """An `ExpertDispatcher` that answers from a transcript, in the order the micro-batch asked."""

    def __init__(self, transcript: ExpertTranscript, num_layers: int, num_experts: int):
        self.transcript, self.num_layers, self.num_experts = transcript, num_layers, num_experts
        self._alive = iter(transcript.alive)
        self._calls = iter(transcript.calls)

    def alive_mask(self, layer: int) -> torch.Tensor:
        recorded = next(self._alive, None)
        if recorded is None or recorded[0] != layer or recorded[1].shape != (self.num_experts,):
            raise TranscriptMismatch(f"the replay asked layer {layer}'s live experts where the record has {recorded and recorded[0]}")
        return recorded[1]

    def dispatch(self, layer: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        call = next(self._calls, None)
        if call is None or call.layer != layer:
            raise TranscriptMismatch(f"the replay called layer {layer} where the record has {call and call.layer}")
        if not set(call.outputs) <= set(inputs):
            raise TranscriptMismatch(f"layer {layer}: recorded answers from experts {sorted(call.outputs)}, asked {sorted(inputs)}")
        outputs = {}
        for index, out in call.outputs.items():
            tokens = inputs[index]
            grad = call.input_grads.get(index)
            if out.shape != tokens.shape or (grad is not None and grad.shape != tokens.shape):
                raise TranscriptMismatch(
                    f"layer {layer} expert {index}: {tuple(tokens.shape)} tokens in the replay, {tuple(out.shape)} recorded"
                )
            outputs[index] = _Replay.apply(tokens, out.to(tokens.device, tokens.dtype), grad)
        return outputs

    def finished(self) -> bool:
        return next(self._alive, None) is None and next(self._calls, None) is None
