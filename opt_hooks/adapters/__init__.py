"""Adapters from SAE-Lens SAEs, TransformerLens models and text datasets to theory units.

- `sae`:   SAEView (x, atoms, z, bias, lam, scope of one SAE or transcoder), make_views
- `model`: ActivationTap / CodeTap / InputTap (hooks, HookedSAETransformer splices), forward_to_deepest,
           check_attachment, model_device, model_name
- `sae_edit`: SAEEdit, changes written into an SAE's own parameters (repair)
- `data`:  token_windows (SAE-Lens style context windows), special_token_mask
"""
from opt_hooks.adapters.data import special_token_mask, token_windows
from opt_hooks.adapters.model import (
    ActivationTap,
    CodeTap,
    InputTap,
    check_attachment,
    forward_to_deepest,
    model_device,
    model_name,
)
from opt_hooks.adapters.sae import EXACT_SCOPE, SUPPORTED_ARCHITECTURES, SAEView, make_views

__all__ = [
    "EXACT_SCOPE",
    "SUPPORTED_ARCHITECTURES",
    "ActivationTap",
    "CodeTap",
    "InputTap",
    "SAEView",
    "check_attachment",
    "forward_to_deepest",
    "make_views",
    "model_device",
    "model_name",
    "special_token_mask",
    "token_windows",
]
