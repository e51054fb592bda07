"""Changes of THEORY.md section 7 written into an SAE-Lens SAE's own parameters.

`SAEEdit` holds a copy of an SAE (the caller's is never touched) and applies, in theory units
(opt_hooks/adapters/sae.py: atoms d_i = W_dec[i] / ||W_dec[i]||, codes z_i = f_i ||W_dec[i]||,
bias b = b_dec, all in the SAE's internal space), the changes a certificate makes:

- `shift_bias(delta)`: b <- b + delta, codes unchanged. b_dec moves; where the encoder reads
  x - b_dec (`apply_b_dec_to_input`), its biases absorb W_enc^T delta so every pre-activation,
  and so every code of every architecture, stays as it was.
- `lower_codes(i, s)`: z_i <- max(z_i - s, 0) (C1's floor). A ReLU code moves its bias; a JumpReLU
  code moves its bias and its threshold (to max(theta - s', 0): exact either way, see below); a
  gated code moves its magnitude bias.
- `turn_atoms(ids, atoms)`: new unit atoms, each decoder row keeping its norm (codes unchanged).
- `scale_codes(ids, factors)`: z_i <- factor z_i (C4's code rule). ReLU and JumpReLU encoders
  scale the row, its bias (and threshold); gated ones their magnitude path; the TopK family, whose
  ranking must not move, scales the decoder row's norm instead (z = f ||W_dec||).
- `plant(k, atom, scale, threshold)`: latent k becomes z_k = scale max(0, <atom, x - b> - threshold)
  with atom `atom` (a resampled dead latent, C6).
- `merge(keep, drop, factor)`: the encoder of `keep` adds `factor` times drop's pre-activation
  (z_keep ~ z_keep + factor z_drop where both fire), and `drop` is silenced (duplicates).
- `silence(k)`: latent k never fires.
- `shift_skip(delta)`: W_skip <- W_skip + delta (a skip transcoder's C7 step; codes unchanged).

Transcoders (sae_lens' Transcoder classes) take every change but `plant`: the residual a
resampled latent points at lives in their output space, while its encoder row must read the input.

Matching-pursuit SAEs are tied: their encoder is a pursuit over W_dec, with no W_enc or b_enc, so
the encoder-side changes (`lower_codes`, `scale_codes`, `plant`, `merge`) have no parameter to go
into and are refused. `turn_atoms` writes W_dec and `shift_bias` b_dec (where the SAE applies it,
`apply_b_dec_to_input`; without it the SAE has no bias and the shift is refused), but the pursuit
reads both, so its codes move with them: these changes are not the audit's fixed-code change, and
only the repair's validation (which re-encodes with the SAE's own `encode`) measures them.

AbsTopK SAEs (signed codes, THEORY.md section 9) encode as TopK does, ranking the pre-activations by
magnitude: they take the bias shift and atom turns as TopK does (a turn writes the decoder row, which
serves both signs: the audit's C3 certificates are tied so), and refuse what TopK refuses; a code
scale is refused too, since the repair's code scales are per sign and both signs share the decoder
row's norm (z = f ||W_dec[i]||).

What a class cannot express raises `NotExpressible` with the reason (a TopK encoder keeps the k
largest pre-activations, so lowering or adding one moves the others). Every exact change is
checked against the audit's own closed form in tests/test_repair.py.
"""
from __future__ import annotations

import copy

import torch
from sae_lens import SAE

TOPK_CODES = ("topk", "batchtopk", "matryoshka_batchtopk")
PURSUIT_CODES = ("matching_pursuit",)  # tied: the encoder is a pursuit over W_dec
SIGNED_CODES = ("abstopk",)  # the k pre-activations of largest magnitude, with their sign
JUMPRELU_CODES = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")  # a threshold per latent


class NotExpressible(ValueError):
    """This SAE class cannot make the change exactly; the message says why."""


_WHAT = {"lower": "lowering one latent's codes", "plant": "resampling a latent with its own code rule",
         "merge": "merging two latents", "scale": "scaling one latent's codes",
         "silence": "silencing one latent"}


def refusal(sae: SAE, change: str) -> str | None:
    """Why this SAE's class cannot make `change` ("lower", "plant", "merge", "scale", "silence") exactly,
    or None."""
    architecture = sae.cfg.architecture()
    what = _WHAT[change]
    if "transcoder" in architecture and change == "plant":
        return (f"{what} is not expressible in a {architecture}: the residual it points at lives in the output "
                "space, while its encoder row must read the input")
    if architecture in PURSUIT_CODES:
        return (f"{what} is not expressible in a {architecture} SAE: its codes come from a pursuit over W_dec "
                "(a tied encoder, with no W_enc or b_enc), so no parameter scales, thresholds or adds one "
                "latent's codes, and a change of W_dec moves every latent's")
    if architecture in SIGNED_CODES and change == "scale":
        return (f"scaling one sign of a latent's codes is not expressible in an {architecture} SAE: both signs "
                "share the decoder row (z = f ||W_dec[i]||), and its encoder ranks the pre-activations by magnitude, "
                "so no parameter scales the positive or the negative codes alone")
    if architecture in (*TOPK_CODES, *SIGNED_CODES):
        if change == "scale" and not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            return None  # the decoder row's norm scales z = f ||W_dec[i]|| and leaves the ranking alone
        if change == "scale":
            return (f"{what} is not expressible in this {architecture} SAE: with rescale_acts_by_decoder_norm "
                    "its ranking reads the decoder norms")
        magnitude = architecture in SIGNED_CODES
        return (f"{what} is not expressible in {'an' if magnitude else 'a'} {architecture} SAE: its encoder keeps "
                f"the k largest pre-activations{' in magnitude' if magnitude else ''}, so moving one latent's "
                "changes which others are kept")
    if architecture == "gated" and change == "merge":
        return (f"{what} is not expressible in a gated SAE: its gate and magnitude paths share W_enc, with a "
                "magnitude scale per latent")
    return None


class SAEEdit:
    """A copy of `sae` and the changes made to it (in theory units, see the module docstring)."""

    def __init__(self, sae: SAE) -> None:
        self.sae = copy.deepcopy(sae)
        self.architecture: str = self.sae.cfg.architecture()
        self.rescaled = bool(getattr(self.sae.cfg, "rescale_acts_by_decoder_norm", False))

    # ---- helpers ------------------------------------------------------------------------
    def _norms(self) -> torch.Tensor:
        return self.sae.W_dec.detach().double().norm(dim=1)

    def _code_units(self, ids: torch.Tensor) -> torch.Tensor:
        """Per latent, theory-unit code per unit of the encoder's output f: ||W_dec[i]|| (1 for the
        TopK family's rescaled decoders, which decode f / ||W_dec|| times W_dec)."""
        return torch.ones(len(ids), dtype=torch.float64) if self.rescaled else self._norms()[ids].cpu()

    def _param(self, name: str) -> torch.Tensor:
        return getattr(self.sae, name).data

    def _set(self, name: str, index, values) -> None:
        data = self._param(name)
        data[index] = torch.as_tensor(values, dtype=torch.float64).to(data.device, data.dtype)

    def _refuse(self, change: str) -> None:
        reason = refusal(self.sae, change)
        if reason is not None:
            raise NotExpressible(reason)

    # ---- the changes ----------------------------------------------------------------------
    @torch.no_grad()
    def shift_bias(self, delta: torch.Tensor) -> None:
        sae = self.sae
        delta = delta.double().to(sae.b_dec.device)
        if self.architecture in PURSUIT_CODES:
            if not sae.cfg.apply_b_dec_to_input:
                raise NotExpressible(
                    f"shifting the bias is not expressible in this {self.architecture} SAE: with "
                    "apply_b_dec_to_input False its reconstruction has no bias (decode adds b_dec only where "
                    "the encoder subtracts it), and turning it on would also move the pursuit's input"
                )
            # the pursuit reads x - b_dec and has no bias to compensate: its codes follow the new b_dec
            # (not the audit's fixed-code change; the repair's validation re-encodes and measures it)
        elif sae.cfg.apply_b_dec_to_input:  # pre-activations read x - b_dec: keep them as they were
            moved = delta @ sae.W_enc.detach().double()
            if self.architecture == "gated":
                sae.b_gate.data += moved.to(sae.b_gate.dtype)
                sae.b_mag.data += (moved * sae.r_mag.detach().double().exp()).to(sae.b_mag.dtype)
            else:
                sae.b_enc.data += moved.to(sae.b_enc.dtype)
        sae.b_dec.data += delta.to(sae.b_dec.dtype)

    @torch.no_grad()
    def lower_codes(self, ids: torch.Tensor, amounts: torch.Tensor) -> None:
        """z_i <- max(z_i - s_i, 0). JumpReLU: z_f = pre where pre > theta. With b' = b - s' and
        theta' = max(theta - s', 0) the new code is max(z_f - s', 0) for theta >= s' (active codes
        exceed s') and for theta < s' (then pre > s' > theta) alike."""
        self._refuse("lower")
        ids = ids.long().cpu()
        shift = amounts.double().cpu() / self._code_units(ids)
        bias = "b_mag" if self.architecture == "gated" else "b_enc"
        self._set(bias, ids, self._param(bias)[ids].double().cpu() - shift)
        if self.architecture in JUMPRELU_CODES:
            self._set("threshold", ids, (self._param("threshold")[ids].double().cpu() - shift).clamp(min=0))

    @torch.no_grad()
    def turn_atoms(self, ids: torch.Tensor, atoms: torch.Tensor) -> None:
        """New unit atoms, each decoder row keeping its norm; the encoder is unchanged, except for a
        matching-pursuit SAE, whose pursuit reads W_dec (its codes follow the new atoms)."""
        ids = ids.long().cpu()
        norms = self._norms()[ids].cpu()
        self._set("W_dec", ids, atoms.double().cpu() / atoms.double().cpu().norm(dim=1, keepdim=True) * norms[:, None])

    @torch.no_grad()
    def scale_codes(self, ids: torch.Tensor, factors: torch.Tensor) -> None:
        ids, factors = ids.long().cpu(), factors.double().cpu()
        if bool((factors < 0).any()):
            raise ValueError("code scale factors must be >= 0")
        self._refuse("scale")
        if self.architecture in TOPK_CODES:  # z = f ||W_dec[i]||: the decoder row's norm scales it, and
            # the ranking, which silencing the encoder would change, stays as it was (a factor 0 too)
            self._set("W_dec", ids, self._param("W_dec")[ids].double().cpu() * factors[:, None])
            return
        dead = factors == 0
        for k in ids[dead].tolist():
            self.silence(k)
        ids, factors = ids[~dead], factors[~dead]
        if self.architecture == "gated":
            self._set("r_mag", ids, self._param("r_mag")[ids].double().cpu() + factors.log())
            self._set("b_mag", ids, self._param("b_mag")[ids].double().cpu() * factors)
            return
        self._set("W_enc", (slice(None), ids), self._param("W_enc")[:, ids].double().cpu() * factors)
        self._set("b_enc", ids, self._param("b_enc")[ids].double().cpu() * factors)
        if self.architecture in JUMPRELU_CODES:
            self._set("threshold", ids, self._param("threshold")[ids].double().cpu() * factors)

    @torch.no_grad()
    def plant(self, k: int, atom: torch.Tensor, scale: float, threshold: float, norm: float) -> None:
        """Latent k: decoder row norm * atom, code scale * max(0, <atom, x - b_dec> - threshold)."""
        self._refuse("plant")
        sae, atom = self.sae, atom.double().cpu() / atom.double().norm().cpu()
        unit = 1.0 if self.rescaled else norm
        row = atom * scale / unit  # f_k = relu(<row, x - b_dec> + bias)
        bias = -threshold * scale / unit
        if not sae.cfg.apply_b_dec_to_input:  # the encoder reads x itself
            bias -= float(row @ sae.b_dec.detach().double().cpu())
        self._set("W_dec", k, atom * norm)
        self._set("W_enc", (slice(None), k), row)
        if self.architecture == "gated":
            self._set("b_gate", k, bias)
            self._set("b_mag", k, bias)
            self._set("r_mag", k, 0.0)
        else:
            self._set("b_enc", k, bias)
        if self.architecture in JUMPRELU_CODES:
            self._set("threshold", k, 0.0)

    @torch.no_grad()
    def merge(self, keep: int, drop: int, factor: float) -> None:
        self._refuse("merge")
        units = self._code_units(torch.tensor([keep, drop]))
        c = factor * float(units[1] / units[0])  # f_keep + c f_drop carries z_keep + factor z_drop
        w_enc = self._param("W_enc").double()
        self._set("W_enc", (slice(None), keep), w_enc[:, keep] + c * w_enc[:, drop])
        # the bias and (JumpReLU) the threshold add as the pre-activations do
        for name in ("b_enc", "threshold") if self.architecture in JUMPRELU_CODES else ("b_enc",):
            values = self._param(name).double()
            self._set(name, keep, float(values[keep] + c * values[drop]))
        self.silence(drop)

    @torch.no_grad()
    def shift_skip(self, delta: torch.Tensor) -> None:
        """W_skip <- W_skip + delta (d_out, d_in): a skip transcoder's prediction moves by delta x."""
        if not hasattr(self.sae, "W_skip"):
            raise NotExpressible(f"a {self.architecture} has no skip connection W_skip to move")
        self.sae.W_skip.data += delta.double().to(self.sae.W_skip.device, self.sae.W_skip.dtype)

    @torch.no_grad()
    def silence(self, k: int) -> None:
        if self.architecture in PURSUIT_CODES:  # its W_enc is W_dec.T: writing it would move the decoder
            self._refuse("silence")
        self._set("W_enc", (slice(None), k), 0.0)
        if self.architecture == "gated":
            self._set("b_gate", k, -1.0)
            self._set("b_mag", k, -1.0)
        else:
            self._set("b_enc", k, -1.0)  # relu(-1) = 0; a JumpReLU threshold is >= 0


def mark_modified(sae: SAE, note: str) -> None:
    """Clear the neuronpedia id (its dashboards describe the released SAE, not this one) and say in
    the metadata (`opt_hooks_repair`, saved with the config) what was changed."""
    metadata = sae.cfg.metadata
    metadata.neuronpedia_id = None
    metadata.opt_hooks_repair = note


def median_alive_norm(sae: SAE) -> float:
    norms = sae.W_dec.detach().double().norm(dim=1)
    alive = norms[norms > 0]
    return float(alive.median()) if len(alive) else 1.0


