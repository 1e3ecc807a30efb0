"""The expert RPC's front door: a hivemind ConnectionHandler that rejects malformed requests before they reach a
task pool, where one bad tensor would fail a whole merged batch."""

from __future__ import annotations

from typing import Sequence

import hivemind
import torch
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend


class RequestError(ValueError):
    """A malformed expert request; the caller gets this message, the host stays up."""


class ValidatingConnectionHandler(ConnectionHandler):
    """Rejects malformed requests before they reach a task pool, where one bad tensor would fail a whole batch
    (and stock hivemind can leave the caller waiting forever)."""

    def __init__(self, dht: hivemind.DHT, module_backends: dict[str, ModuleBackend], *, hidden_dim: int, max_tokens: int):
        super().__init__(dht, module_backends)
        self.hidden_dim, self.max_tokens = hidden_dim, max_tokens

    @classmethod
    def _get_handle_name(cls, namespace, method_name):
        # answer under stock hivemind's protocol names, so stock RemoteExpert clients reach us
        return ConnectionHandler._get_handle_name(namespace, method_name)

    async def _process_inputs(self, inputs, pool, schema):
        expected_count = 2 if pool.name.endswith("_backward") else 1
        check_request_tensors(inputs, expected_count, self.hidden_dim, self.max_tokens)
        return await super()._process_inputs(inputs, pool, schema)


def check_request_tensors(inputs: Sequence[torch.Tensor], expected_count: int, hidden_dim: int, max_tokens: int) -> None:
    """Pure check of one request: count, shape [n, hidden], float dtype, size limit, finite values."""
    if len(inputs) != expected_count:
        raise RequestError(f"expected {expected_count} tensor(s), got {len(inputs)}")
    first_rows = inputs[0].shape[0] if inputs[0].ndim == 2 else None
    for tensor in inputs:
        if tensor.ndim != 2 or tensor.shape[1] != hidden_dim:
            raise RequestError(f"expected shape [tokens, {hidden_dim}], got {list(tensor.shape)}")
        if tensor.shape[0] != first_rows:
            raise RequestError("tensors of one request must have the same number of tokens")
        if not 0 < tensor.shape[0] <= max_tokens:
            raise RequestError(f"request has {tensor.shape[0]} tokens; allowed 1..{max_tokens}")
        if not tensor.is_floating_point():
            raise RequestError(f"expected a floating point tensor, got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise RequestError("request contains NaN or Inf")
