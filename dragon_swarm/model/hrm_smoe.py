"""HRM-sMoE: a Hierarchical Reasoning Model whose feed-forwards are sparse MoE layers.

Single-process model code, in the spirit of nanoGPT: it knows nothing about
peers, DHTs or deadlines. Every MoE layer asks an `ExpertDispatcher` which
experts are alive and hands it the tokens for the chosen ones; whether those
experts run in this process (`LocalExperts`) or on volunteers' machines is the
dispatcher's business.

Shape of one forward (B = batch, T = time, C = d_model, V = vocab):

    x  = (tok_emb(tokens) + pos_emb(t)) * sqrt(C)             [B, T, C]
    zH, zL = learned initial states                            [C] -> [B, T, C]
    for each of h_cycles:
        for each of l_cycles:
            zL = L_module(zL + zH + x)      # fast, low-level steps
        zH = H_module(zH + zL)              # one slow, high-level step
    logits = norm(zH) @ tok_emb.weight.T                       [B, T, V]

A module is a stack of pre-norm blocks (causal self-attention + MoE FFN)
followed by an RMSNorm. That closing norm is our one addition to the plain
pre-norm recipe: the states are fed back into themselves many times, and
without it their scale would grow with every cycle (HRM itself uses post-norm
for the same reason).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dragon_swarm.model.config import ModelConfig
from dragon_swarm.model.dispatch import ExpertDispatcher, LocalExperts

DISPATCHER_PREFIX = "dispatcher."


# ---------------------------------------------------------------------------
# Routing math: pure functions, tested without a model.
# ---------------------------------------------------------------------------


@dataclass
class Routing:
    """Routing decision for N tokens over E experts, k of which each token uses."""

    probs: torch.Tensor  # [N, E] float32 softmax over alive experts (dead ones are 0)
    experts: torch.Tensor  # [N, k] long, chosen expert indices, best first
    weights: torch.Tensor  # [N, k] float32, softmax over the k chosen logits


def route(gate_logits: torch.Tensor, alive: torch.Tensor, top_k: int) -> Routing:
    """Top-k routing restricted to alive experts.

    gate_logits: [N, E]; alive: bool [E] with at least one True. When fewer than
    `top_k` experts are alive every token uses all alive ones.
    """
    n_alive = int(alive.sum())
    if n_alive == 0:
        raise ValueError("route() needs at least one alive expert")
    k = min(top_k, n_alive)
    # Softmax in float32 even under bf16 autocast: gate logits are small and
    # the load-balancing loss multiplies probabilities together.
    logits = gate_logits.float().masked_fill(~alive, float("-inf"))
    probs = logits.softmax(dim=-1)
    top_logits, experts = logits.topk(k, dim=-1)
    return Routing(probs=probs, experts=experts, weights=top_logits.softmax(dim=-1))


def load_balancing_loss(routing: Routing, alive: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over alive experts: n_alive * sum_i f_i * P_i.

    f_i: fraction of the N*k token->expert assignments that went to expert i
    (so sum f_i = 1), P_i: mean gate probability of expert i. Equals 1 when the
    routing is perfectly uniform over alive experts and grows as it collapses.
    Only P carries gradient (f comes from a discrete top-k).
    """
    n_tokens, k = routing.experts.shape
    num_experts = routing.probs.shape[-1]
    counts = torch.bincount(routing.experts.reshape(-1), minlength=num_experts)
    f = counts.to(routing.probs.dtype) / (n_tokens * k)
    p = routing.probs.mean(dim=0)
    # Dead experts have f = P = 0 already; the mask only documents the intent.
    return alive.sum() * (f * p * alive).sum()


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MoEFeedForward(nn.Module):
    """Sparse FFN: the gate lives here (in the trunk), the experts behind a dispatcher.

    Per call: gate -> mask dead experts -> top-k -> group tokens per expert ->
    ONE `dispatcher.dispatch` call (so a remote dispatcher can run all experts
    in parallel) -> weighted sum. Tokens whose experts failed are renormalised
    over the experts that answered; a token with no answer gets zero FFN output,
    i.e. its residual stream passes through unchanged. Per-token routing with no
    capacity limit keeps the layer causal: a token's output never depends on
    other tokens.
    """

    def __init__(self, config: ModelConfig, moe_layer: int):
        super().__init__()
        self.moe_layer = moe_layer
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor, dispatcher: ExpertDispatcher) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C] (already normalised) -> (ffn output [B, T, C], aux loss scalar)."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        N = flat.shape[0]

        alive = torch.as_tensor(dispatcher.alive_mask(self.moe_layer), dtype=torch.bool, device=x.device)
        if alive.shape != (self.num_experts,):
            raise ValueError(
                f"alive_mask({self.moe_layer}) has shape {tuple(alive.shape)}, expected ({self.num_experts},)"
            )
        if not alive.any():
            # Nobody to ask: the block degrades to attention only.
            return torch.zeros_like(x), x.new_zeros((), dtype=torch.float32)

        routing = route(self.gate(flat), alive, self.top_k)
        aux = load_balancing_loss(routing, alive)
        k = routing.experts.shape[1]

        # Sort the N*k (token, expert) assignments by expert so every group is a
        # contiguous span; groups keep tokens in their original order.
        assigned = routing.experts.reshape(-1)
        token_of = torch.arange(N, device=x.device).repeat_interleave(k)
        order = torch.argsort(assigned, stable=True)
        tokens_sorted = token_of[order]
        weights_sorted = routing.weights.reshape(-1)[order]
        counts = torch.bincount(assigned, minlength=self.num_experts).tolist()

        inputs: dict[int, torch.Tensor] = {}
        spans: dict[int, tuple[int, int]] = {}
        start = 0
        for expert, count in enumerate(counts):
            if count:
                spans[expert] = (start, start + count)
                inputs[expert] = flat[tokens_sorted[start : start + count]]
            start += count

        outputs = dispatcher.dispatch(self.moe_layer, inputs)

        unexpected = set(outputs) - set(inputs)
        if unexpected:
            raise ValueError(f"dispatcher answered for experts it was not asked: {sorted(unexpected)}")
        if not outputs:
            return torch.zeros_like(x), aux

        rows, contribs, used_weights = [], [], []
        for expert, out in outputs.items():
            if out.shape != inputs[expert].shape:
                raise ValueError(
                    f"expert {self.moe_layer}.{expert} returned shape {tuple(out.shape)}, "
                    f"expected {tuple(inputs[expert].shape)}"
                )
            lo, hi = spans[expert]
            w = weights_sorted[lo:hi]
            rows.append(tokens_sorted[lo:hi])
            contribs.append(out.to(device=flat.device, dtype=flat.dtype) * w.to(flat.dtype).unsqueeze(1))
            used_weights.append(w)
        rows_cat = torch.cat(rows)
        y = flat.new_zeros(N, C).index_add(0, rows_cat, torch.cat(contribs))

        if len(outputs) < len(inputs):
            # Some experts failed: spread each token's weight over the experts
            # that did answer. When all answer the weights already sum to 1.
            answered = routing.weights.new_zeros(N).index_add(0, rows_cat, torch.cat(used_weights))
            answered = torch.where(answered > 0, answered, torch.ones_like(answered))
            y = y / answered.to(y.dtype).unsqueeze(1)
        return y.view(B, T, C), aux


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config: ModelConfig, moe_layer: int):
        super().__init__()
        self.norm_attn = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm_ffn = nn.RMSNorm(config.d_model)
        self.moe = MoEFeedForward(config, moe_layer)
        self.ffn_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, dispatcher: ExpertDispatcher) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm_attn(x))
        h, aux = self.moe(self.norm_ffn(x), dispatcher)
        return x + self.ffn_dropout(h), aux


class RecurrentModule(nn.Module):
    """One HRM module (high- or low-level): blocks, then a norm on the new state."""

    def __init__(self, config: ModelConfig, first_moe_layer: int, n_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config, first_moe_layer + i) for i in range(n_layers))
        self.norm = nn.RMSNorm(config.d_model)

    def forward(self, x: torch.Tensor, dispatcher: ExpertDispatcher) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (new state, sum of the blocks' aux losses)."""
        aux_sum = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, aux = block(x, dispatcher)
            aux_sum = aux_sum + aux
        return self.norm(x), aux_sum


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class HRMSMoE(nn.Module):
    """HRM recurrence over pre-norm transformer blocks with sparse MoE FFNs.

    The trunk (embeddings, attention, norms, gates, initial states) is every
    parameter except the dispatcher's; a `LocalExperts` dispatcher becomes the
    submodule `dispatcher`, a remote one holds no parameters here.
    """

    def __init__(self, config: ModelConfig, dispatcher: ExpertDispatcher):
        super().__init__()
        if (dispatcher.num_layers, dispatcher.num_experts) != (config.num_moe_layers, config.num_experts):
            raise ValueError(
                f"dispatcher serves {dispatcher.num_layers} layers x {dispatcher.num_experts} experts, "
                f"config needs {config.num_moe_layers} x {config.num_experts}"
            )
        self.config = config
        C = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, C)  # also the output head (tied)
        self.pos_emb = nn.Embedding(config.seq_len, C)
        self.emb_dropout = nn.Dropout(config.dropout)
        # Embeddings start small (std 0.02) so the tied head starts near uniform
        # (apart from the usual tied-head bias toward repeating the input token,
        # worth ~1 nat at d_model 768, gone after a few steps). Scaling by
        # sqrt(C) brings the input to the order of the RMS-normalised states,
        # so x is not drowned in zL + zH + x.
        self.embed_scale = math.sqrt(C)
        self.z_h_init = nn.Parameter(torch.empty(C))
        self.z_l_init = nn.Parameter(torch.empty(C))
        self.h_module = RecurrentModule(config, first_moe_layer=0, n_layers=config.h_layers)
        self.l_module = RecurrentModule(config, first_moe_layer=config.h_layers, n_layers=config.l_layers)
        self.norm_f = nn.RMSNorm(C)
        self.dispatcher = dispatcher  # a submodule only if it is an nn.Module
        self._init_trunk()

    def _init_trunk(self) -> None:
        # nanoGPT-style init, applied to the trunk only: experts initialise
        # themselves (ExpertFFN.reset_parameters) because hosts build them alone.
        proj_std = 0.02 / math.sqrt(2 * self.config.num_moe_layers)
        for name, module in self.named_modules():
            if name.startswith(DISPATCHER_PREFIX) or name == "dispatcher":
                continue
            if isinstance(module, nn.Linear):
                std = proj_std if name.endswith("attn.proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # Initial states start small. They are the same for every token, so at
        # unit scale they would dominate the first steps' inputs, every gate
        # would see nearly the same vector, and all tokens would pick the same
        # experts (measured: one expert got 100% of tokens at init). Small, the
        # first low step sees mostly x and routing starts near balanced.
        nn.init.normal_(self.z_h_init, mean=0.0, std=0.02)
        nn.init.normal_(self.z_l_init, mean=0.0, std=0.02)

    def _grad_scope(self, keep_grad: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if keep_grad else torch.no_grad()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: long [B, T] with T <= seq_len -> (logits [B, T, V], aux loss scalar).

        The aux loss is the mean over MoE layer invocations that carry gradient
        (all of them, or with `one_step_grad` only those of the final low- and
        high-level steps), so its scale does not depend on the cycle counts.
        """
        cfg = self.config
        B, T = tokens.shape
        if T > cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds seq_len {cfg.seq_len}")
        pos = torch.arange(T, device=tokens.device)
        x = self.emb_dropout((self.tok_emb(tokens) + self.pos_emb(pos)) * self.embed_scale)

        z_h = self.z_h_init.expand(B, T, -1)
        z_l = self.z_l_init.expand(B, T, -1)
        aux_sum = x.new_zeros((), dtype=torch.float32)
        aux_count = 0
        for h in range(cfg.h_cycles):
            last_h = h == cfg.h_cycles - 1
            for l in range(cfg.l_cycles):
                keep = not cfg.one_step_grad or (last_h and l == cfg.l_cycles - 1)
                with self._grad_scope(keep):
                    z_l, aux = self.l_module(z_l + z_h + x, self.dispatcher)
                if keep:
                    aux_sum, aux_count = aux_sum + aux, aux_count + cfg.l_layers
            keep = not cfg.one_step_grad or last_h
            with self._grad_scope(keep):
                z_h, aux = self.h_module(z_h + z_l, self.dispatcher)
            if keep:
                aux_sum, aux_count = aux_sum + aux, aux_count + cfg.h_layers

        logits = F.linear(self.norm_f(z_h), self.tok_emb.weight)
        return logits, aux_sum / aux_count

    def compute_loss(
        self, tokens: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (total, cross-entropy, aux); total = ce + aux_loss_weight * aux.

        Targets equal to -100 are ignored (F.cross_entropy's default).
        """
        logits, aux = self(tokens)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return ce + self.config.aux_loss_weight * aux, ce, aux

    # --- trunk / expert split: trainers own and average only the trunk ---

    def named_trunk_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if not name.startswith(DISPATCHER_PREFIX):
                yield name, param

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_trunk_parameters():
            yield param

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without expert weights. No tensor appears twice (the head
        reuses tok_emb.weight without its own key), so it saves with safetensors."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DISPATCHER_PREFIX)}

    def load_trunk_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a `trunk_state_dict`; raises ValueError on missing or unexpected keys."""
        expected = set(self.trunk_state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"trunk state mismatch: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(state_dict, strict=False)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts for `config`, without allocating any weights.

    trunk: everything a trainer holds; experts: all experts of all layers;
    per_expert: one expert; total: trunk + experts; active: parameters that
    touch one token (trunk + top_k experts per MoE layer).
    """
    with torch.device("meta"):
        experts = LocalExperts.from_config(config)
        model = HRMSMoE(config, experts)
    trunk = sum(p.numel() for p in model.trunk_parameters())
    all_experts = sum(p.numel() for p in experts.parameters())
    per_expert = sum(p.numel() for p in experts.experts[0][0].parameters())
    return {
        "trunk": trunk,
        "experts": all_experts,
        "per_expert": per_expert,
        "total": trunk + all_experts,
        "active": trunk + config.top_k * config.num_moe_layers * per_expert,
    }
