"""Run the dense model over calibration tokens while hooks record activations (for the baselines' initialisations)."""

from __future__ import annotations

import torch


@torch.no_grad()
def run_dense_with_hooks(model, routing, input_ids: torch.Tensor, handles: list, batch_size: int = 4) -> None:
    """Dense forwards (routing switched off) of ``input_ids`` in batches; removes the hook ``handles`` afterwards."""
    device = next(model.parameters()).device
    try:
        with routing.disabled():
            for start in range(0, len(input_ids), batch_size):
                model.get_decoder()(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
