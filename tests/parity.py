"""Helpers shared by the parity tests: redraw every parameter of a tiny reference model (so a wrong norm,
bias or weight mapping cannot hide behind default initialisations), the error that is reported, and the
check that a released layout's every key maps onto our parameters."""
import torch

import model as M


def redraw(module, seed=0, scale=0.2):
    """Every parameter ~ N(0, scale^2), norms' weights around 1; deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 and "norm" in name else 0.0))
    return module


def max_diff(a, b, mask=None):
    """Largest absolute difference, over the positions where mask is true when given."""
    d = (a.float() - b.float()).abs()
    return (d[mask.bool()] if mask is not None else d).max().item()


def assert_keys_map(family: str, ref_state: dict, ours_params: dict):
    """Every key of a released state dict maps (model.KEY_TABLES) to one of our parameters of the same shape,
    and there are as many of ours as of theirs."""
    for key, p in ref_state.items():
        found, name = M._lookup(M.KEY_TABLES[family], M._canonical(family, key))
        assert found and ours_params[name].shape == p.shape, key
    assert len(ours_params) == len(ref_state)
