"""opt_hooks: which SAE features are provably non-optimal, with certificates.

    import opt_hooks as oh
    result = oh.audit(model, saes, dataset, n_tokens=200_000)
    result.layers["blocks.8.hook_resid_pre"].flagged()

See docs/API.md for the public surface and docs/THEORY.md for the conditions.
"""
from opt_hooks.api import Monitor, audit, audit_activations, monitor
from opt_hooks.engine import AuditOptions
from opt_hooks.result import AuditResult, CertificateCheck, FeatureRow, LayerResult, PairRow

__version__ = "0.1.0"

__all__ = [
    "AuditOptions",
    "AuditResult",
    "CertificateCheck",
    "FeatureRow",
    "LayerResult",
    "Monitor",
    "PairRow",
    "audit",
    "audit_activations",
    "monitor",
]
