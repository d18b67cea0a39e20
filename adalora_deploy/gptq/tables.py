"""The token tables of a GPTQ base: the lm_head quantized like every other linear, the tied embedding with it.

A small model spends a large share of its bytes on the ``[vocab, hidden]`` table (SmolLM2-135M: 49152 x 576,
113 MB in fp32, a quarter of its weights), read whole for every generated token's logits. Quantizing it in
the base, before training, lets the adapter learn against the very table the edge graph holds::

    last decoder layer ─> final norm ─> x ──(Hessian 2 XᵀX / N)──> GPTQ solve of lm_head.weight ─> QuantLinear
                                                                     │ tied embedding?
                                                                     └─> embed_tokens.weight = dequant(lm_head)

A tied embedding becomes the dequantized table (one table: the export writes it once, as the lm_head's
MatMulNBits blocks and, reshaped, as GatherBlockQuantized rows). The checkpoint stays standard: the lm_head
is a GPTQ layer (``quantization_config["lm_head"] = true``, as gptqmodel writes it) and the embedding a float
tensor holding the same dequantized numbers, with ``tie_word_embeddings`` false. An untied embedding stays
float (a lookup has no Hessian, and the GPTQ format has no quantized embedding).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from adalora_deploy.errors import QuantizationError
from adalora_deploy.gptq.solver import HessianAccumulator, QuantizedWeight, gptq_quantize, rtn_quantize

__all__ = ["quantize_lm_head", "tied_embedding"]

logger = logging.getLogger(__name__)


def tied_embedding(model: nn.Module) -> bool:
    """Whether the input embedding and the lm_head share one weight tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return (isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
            and head.weight.data_ptr() == embed.weight.data_ptr())


def _final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(getattr(model, "model", None), "norm", None)
    if not isinstance(norm, nn.Module):
        raise QuantizationError("quantizing the lm_head with GPTQ needs the final norm at model.model.norm "
                                "(Llama family); use method rtn or leave the tables float")
    return norm


def quantize_lm_head(model: nn.Module, last_hidden: list[torch.Tensor] | None, *, method: str, bits: int,
                     group_size: int, sym: bool, desc_act: bool, percdamp: float, block_size: int,
                     checkpoint_format: str) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Swap ``model``'s lm_head for a :class:`QuantLinear` (and a tied embedding for its dequantized table).

    Args:
        model: a causal LM whose decoder layers are already quantized.
        last_hidden: the last decoder layer's outputs on the calibration batches (GPTQ), or None (RTN).
        method, bits, group_size, sym, desc_act, percdamp, block_size, checkpoint_format: as for the layers.

    Returns:
        The quantized table and the Hessian it was solved with (None for RTN), for the caller's error report.
    """
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise QuantizationError(f"the lm_head is {type(head).__name__}, not nn.Linear: it cannot be quantized here")
    tied = tied_embedding(model)
    weight = head.weight.detach().float()
    hessian = None
    if method == "gptq":
        if last_hidden is None:
            raise QuantizationError("GPTQ on the lm_head needs the calibration forwards")
        norm = _final_norm(model)
        accumulator = HessianAccumulator(head.in_features, weight.device)
        with torch.no_grad():
            for hidden in last_hidden:
                accumulator.add(norm(hidden))
        hessian = accumulator.hessian
        quantized = gptq_quantize(weight, hessian, bits=bits, group_size=group_size, sym=sym,
                                  desc_act=desc_act, percdamp=percdamp, block_size=block_size)
    else:
        quantized = rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym)
    bias = None if head.bias is None else head.bias.detach()
    layer = quantized.to_module(bias=bias, checkpoint_format=checkpoint_format).to(weight.device)
    if tied:
        embed = model.get_input_embeddings()
        embed.weight = nn.Parameter(layer.dequantize_weight(torch.float32).to(embed.weight.dtype), requires_grad=False)
        model.config.tie_word_embeddings = False
    model.set_output_embeddings(layer)
    logger.info("lm_head quantized (%s, %d-bit, group %d)%s", method, bits, group_size,
                "; the tied embedding holds the same table" if tied else "; the untied embedding stays float")
    return quantized, hessian
