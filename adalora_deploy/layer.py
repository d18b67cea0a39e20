"""The SVD adapter layer: a frozen base linear plus ``P Λ Q`` (AdaLoRA, Eq. 3).

::

    x ──► base_layer (frozen: dense, bnb 4/8-bit, GPTQ) ──────────────────► (+) ──► y
    │                                                                        ▲
    └──► dropout ──► Q^T (d_in→r) ──► ·Λ ──► P^T (r→d_out) ──► · scale ─────┘

    scale = lora_alpha / (init_r + 1e-5), fixed for the whole run and after compaction.

With ``down_weights="int8"`` (a GPTQ base with int8 activations) the down-projection computes as the 8-bit
MatMulNBits the exporter writes for it: the base's int8 activation codes times ``Λ Q`` quantized per row to
8-bit blocks of the base's block size, both straight-through in the backward
(:func:`~adalora_deploy.gptq.int8_compute.fake_quantize_weights`)::

    x ──► int8 codes (shared with the base) ──► · 8-bit(Λ Q)^T ──► P^T ──► · scale

The layer holds its state in Parameters and buffers only (``lora_A`` = Q, ``lora_E`` = Λ, ``lora_B`` = P,
``ranknum`` = init_r, ``rank_mask`` = which of the init_r triplets are alive, ``compacted`` = whether
P, Λ, Q hold only those rows/columns or all init_r of them), so ``state_dict()``
round-trips and compaction reads state instead of parsing names. The math is in
:mod:`adalora_deploy.functional`; the base layer is only called, never opened (see :mod:`backends`).
"""

from __future__ import annotations

import torch
from torch import nn

from adalora_deploy import functional as F
from adalora_deploy.backends import LinearBackend, backend_for
from adalora_deploy.errors import ConfigError
from adalora_deploy.gptq.int8_compute import fake_quantize_activations, fake_quantize_weights

__all__ = ["AdaLoraLinear"]


class AdaLoraLinear(nn.Module):
    """A base linear layer with an AdaLoRA adapter.

    Args:
        base_layer: the frozen layer (its parameters are set to ``requires_grad=False``).
        init_r: initial rank r.
        lora_alpha: numerator of the scale.
        lora_dropout: dropout probability on the adapter input.
        generator: optional RNG for the N(0, 0.02^2) init of P and Q (Λ starts at 0, so ΔW = 0).
        down_weights: ``fp32``, or ``int8`` (see the module docstring; the base must compute with int8
            activations, ``model.activations: int8``).

    Raises:
        ConfigError: ``down_weights="int8"`` on a base without int8 activations.
    """

    def __init__(self, base_layer: nn.Module, init_r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 generator: torch.Generator | None = None, down_weights: str = "fp32"):
        super().__init__()
        self.base_layer = base_layer
        self.backend: LinearBackend = backend_for(base_layer)
        if down_weights == "int8" and getattr(base_layer, "activation_block", None) is None:
            raise ConfigError(f"adapter.down_weights = 'int8': the base layer ({type(base_layer).__name__}) does not "
                              "compute with int8 activations; use a GPTQ base with model.activations: int8")
        self.down_weights = down_weights
        self.in_features, self.out_features = self.backend.features(base_layer)
        self.init_r = init_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
        device = _device_of(base_layer)
        self.lora_A = nn.Parameter(torch.empty(init_r, self.in_features, device=device))
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, init_r, device=device))
        with torch.no_grad():
            self.lora_A.copy_(torch.randn(init_r, self.in_features, generator=generator) * 0.02)
            self.lora_B.copy_(torch.randn(self.out_features, init_r, generator=generator) * 0.02)
        self.register_buffer("ranknum", torch.tensor(float(init_r), device=device))
        self.register_buffer("rank_mask", torch.ones(init_r, dtype=torch.bool, device=device))
        self.register_buffer("compacted", torch.tensor(False, device=device))

    @property
    def scale(self) -> float:
        """``lora_alpha / (init_r + 1e-5)``: init_r, never the current rank, also after compaction."""
        return F.adapter_scale(self.lora_alpha, self.init_r)

    @property
    def rank(self) -> int:
        """Number of triplets physically present (init_r before compaction)."""
        return self.lora_E.shape[0]

    @property
    def live_rank(self) -> int:
        """Number of triplets the mask keeps (the rank after compaction)."""
        return int(self.rank_mask.sum().item())

    @property
    def is_compacted(self) -> bool:
        """Whether P, Λ, Q were sliced to the kept triplets."""
        return bool(self.compacted.item())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.rank == 0:
            return result
        adapter_in = self.lora_dropout(x.to(self.lora_A.dtype))
        if self.down_weights == "int8":
            block, perm = self.down_layout()
            codes = fake_quantize_activations(adapter_in, block, perm)  # the base's: cached on adapter_in when it is x
            delta = (codes @ self._int8_down(self.lora_A, self.lora_E).T @ self.lora_B.T) * self.scale
        else:
            delta = F.adapter_output(adapter_in, self.lora_A, self.lora_E, self.lora_B, self.scale)
        return result + delta.to(result.dtype)

    def down_layout(self) -> tuple[int, torch.Tensor | None]:
        """``(block_size, perm)`` of an int8 down-projection: the base's MatMulNBits block and channel order."""
        return self.base_layer.activation_block, self.base_layer.activation_order()

    def _int8_down(self, lora_A: torch.Tensor, lora_E: torch.Tensor) -> torch.Tensor:
        """``Λ Q`` on the 8-bit grid of an int8 down-projection (straight-through gradients)."""
        block, perm = self.down_layout()
        return fake_quantize_weights(lora_A * lora_E, block, perm)

    def live_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Q', Λ', P')`` of the triplets alive in ``rank_mask``, detached: ``(r_k, d_in), (r_k, 1), (d_out, r_k)``."""
        tensors = (self.lora_A.detach(), self.lora_E.detach(), self.lora_B.detach())
        if self.is_compacted:
            return tensors
        return F.slice_triplets(*tensors, self.rank_mask)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` of the live triplets, ``(out_features, in_features)``, float32 (with ``down_weights="int8"``, of
        ``Λ Q`` on its 8-bit grid, as trained)."""
        lora_A, lora_E, lora_B = self.live_factors()
        if self.down_weights == "int8":
            return (lora_B.float() @ self._int8_down(lora_A.float(), lora_E.float())) * self.scale
        return F.adapter_delta(lora_A.float(), lora_E.float(), lora_B.float(), self.scale)

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        """Record ``keep`` (bool, (init_r,)) and zero Λ of the masked triplets; P and Q are untouched."""
        keep = keep.to(device=self.rank_mask.device, dtype=torch.bool).view(-1)
        if keep.numel() != self.init_r:
            raise ValueError(f"mask has {keep.numel()} entries, layer has init_r = {self.init_r}")
        if self.is_compacted:
            if not torch.equal(keep, self.rank_mask):
                raise RuntimeError("a compacted layer's rank pattern is frozen; it cannot be re-masked")
            return
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    @torch.no_grad()
    def compact_(self) -> torch.Tensor:
        """Slice P, Λ, Q in place to the triplets in ``rank_mask``; returns their indices (into init_r).

        New Parameter objects replace the old ones: an optimizer holding the old ones must be re-pointed
        (see :func:`adalora_deploy.compaction.compact_in_place`). Idempotent.
        """
        index = self.rank_mask.nonzero().view(-1)
        if self.is_compacted:
            return index
        lora_A, lora_E, lora_B = F.slice_triplets(self.lora_A, self.lora_E, self.lora_B, self.rank_mask)
        trainable = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(lora_A.clone(), requires_grad=trainable)
        self.lora_E = nn.Parameter(lora_E.clone(), requires_grad=trainable)
        self.lora_B = nn.Parameter(lora_B.clone(), requires_grad=trainable)
        self.compacted.fill_(True)
        return index

    @torch.no_grad()
    def load_compacted(self, rank_mask: torch.Tensor, lora_A: torch.Tensor, lora_E: torch.Tensor,
                       lora_B: torch.Tensor) -> None:
        """Set already-sliced factors (as PEFT saves them) and their rank pattern."""
        rank_mask = rank_mask.to(dtype=torch.bool, device=self.rank_mask.device).view(-1)
        rank = int(rank_mask.sum())
        expected = {"lora_A": (rank, self.in_features), "lora_E": (rank, 1), "lora_B": (self.out_features, rank)}
        for name, tensor in (("lora_A", lora_A), ("lora_E", lora_E), ("lora_B", lora_B)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                                 f"(rank {rank} of the rank pattern)")
        if rank_mask.numel() != self.init_r:
            raise ValueError(f"rank pattern has {rank_mask.numel()} entries, expected init_r = {self.init_r}")
        device, dtype = self.lora_A.device, self.lora_A.dtype
        trainable = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(lora_A.to(device, dtype).clone(), requires_grad=trainable)
        self.lora_E = nn.Parameter(lora_E.to(device, dtype).clone(), requires_grad=trainable)
        self.lora_B = nn.Parameter(lora_B.to(device, dtype).clone(), requires_grad=trainable)
        self.rank_mask.copy_(rank_mask)
        self.compacted.fill_(True)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"init_r={self.init_r}, lora_alpha={self.lora_alpha}, base={self.backend.describe(self.base_layer)}"
                + (", down_weights=int8" if self.down_weights == "int8" else ""))


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
