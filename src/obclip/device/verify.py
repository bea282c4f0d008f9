"""Device-side verification of the cloud's whole answer, the same whatever is real.

An active server can try to learn which candidate is real by poisoning one
member's returned latent (non-finite, huge, or plausible-looking but wrong):
if the device only ever looked at its own member (implicitly, by decoding it),
the user would see a broken image exactly when the server's guess was right,
and the app's reaction (an error, a retry, a complaint) would confirm it.

So before the device touches its own latent it checks EVERY member's latent
and solver state (``prev_x0``) against one envelope, the same for all N, and
refuses the whole answer if any member fails, with an error that does not
depend on which member is real. It never retries: a retry after a failure is
itself a signal (and the same poisoned answer would come back).

The envelope, from the variance-preserving noise schedule. After k solver
steps the latent is x_k = alpha_k * x0 + sigma_k * eps with alpha_k^2 +
sigma_k^2 = 1 (``Schedule.alpha_t`` / ``sigma_t`` at index k; alpha_k =
sqrt(alpha_bar_t)). Latents are scaled to about unit variance (the VAE's
scaling factor), so with eps ~ N(0, 1) the expected per-element root mean
square is

    rms(x_k) = sqrt(alpha_k^2 * E[x0^2] + sigma_k^2)        (~1 when E[x0^2] = 1)

We bound E[x0^2] <= X0^2 (X0_RMS_MAX = 3 is generous at the usual guidance 7.5 for
real images' latents, docs/security.md). Classifier-free guidance moves the
data prediction linearly: x0_g = x0_u + g * (x0_c - x0_u), so above the
reference guidance G_REF = 7.5 the bound grows with it: X0 = X0_RMS_MAX *
max(1, g / G_REF). The solver state ``prev_x0`` is the data prediction made at
the previous step k-1, from a guided noise estimate:
x0_hat = x0 + (sigma/alpha)_{k-1} * (eps - eps_hat), so its error is the noise
estimate's error amplified by the noise-to-signal ratio of that step (x6 at
step 4 of 25, x2.6 at step 9). With the guided estimate's error bounded by
EPS_ERR * max(1, g) (EPS_ERR = 0.1; the cond - uncond difference is multiplied by g), and a
further MARGIN:

    rms(x_k)     <= MARGIN * sqrt(alpha_k^2 * X0^2 + sigma_k^2)                  (4.5 at g <= 7.5)
    rms(prev_x0) <= MARGIN * (X0 + EPS_ERR * max(1, g) * (sigma/alpha)_{k-1})    (11.4 at k = 5, g = 7.5)
    max |value|  <= PEAK * the rms bound    (a Gaussian's peak over ~16k values is ~4.5 sigma)

What honest answers of the trained ObCLIP-Mini reach against these bounds is in
docs/security.md ("The whole answer is verified"); a bound on prev_x0 that ignored
the step and the guidance refused some of them.

A latent at 10x the expected norm (rms ~10) fails every bound; 3e38 and
NaN/inf fail them by far. There is deliberately no lower bound: at k = T
(all steps in the cloud) sigma_k = 0 and a flat image has a small latent.

What an active server can still learn (docs/security.md): the check is
statistical, so a member replaced by a *plausible* but wrong latent (another
prompt's trajectory, a different seed, a subtly shifted latent inside the
envelope) passes, and the device finishes from it if it is the real one. The
user then sees an image that does not match the prompt. Nothing the device
sends changes, but if the user (or the app) reacts - regenerates, reports the
image, retries the same request - the server learns that its guess hit. Apps
must therefore (1) never resend the same request after a failed verification
(show the error and let the user decide, preferably with a fresh seed and
later), and (2) treat "the image looks wrong" the same way: do not
automatically regenerate. A failed verification says the server is faulty or
hostile; it says nothing about which member is real, and neither does the
error text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from obclip.runtime.errors import InputError, UntrustedAnswerError
from obclip.runtime.manifest import MANIFEST_NAME, Manifest, ManifestFormatError
from obclip.runtime.options import check_fields, option
from obclip.runtime.protocol import Handoff
from obclip.runtime.solver import Schedule


class VerificationError(UntrustedAnswerError):
    """The cloud's answer failed the device's checks; the whole answer is refused.

    The message depends only on the answer, never on which member is real.
    Do not resend the same request after this error (a retry tells the server
    its tampering was noticed, and a hostile server would answer the same way):
    it is an ``UntrustedAnswerError``, deliberately not a ``ServiceError`` (the
    retryable kind) nor a ``ValueError``.
    """


@dataclass(frozen=True)
class VerifyConfig:
    """Bounds of the statistics envelope (see the module docstring for how they follow)."""

    x0_rms_max: float = option(3.0, "per-element rms of a clean latent x0 at guidance <= reference_guidance, "
                               "generous", gt=0)
    margin: float = option(1.5, "slack on top of the expected spread", gt=0)
    reference_guidance: float = option(7.5, "above it the x0 bound grows in proportion to the guidance scale",
                                       gt=0)
    eps_error_max: float = option(0.10, "rms error of the noise estimate, per unit of guidance (at least 1)",
                                  gt=0)
    peak: float = option(12.0, "largest |value| allowed, in units of the rms bound", gt=0)
    # The envelope assumes a trained model (latents at unit variance). A model with random
    # weights (the test suite's) predicts noise badly, so its trajectories leave the envelope;
    # for it only the finiteness check applies. Decided at export from the model's own files
    # (the engines manifest's ``verification``), never from anything the server sends.
    statistics: bool = True

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class Envelope:
    latent_rms_max: float
    prev_x0_rms_max: float
    peak: float


def config_for(manifest: Manifest) -> VerifyConfig:
    """The checks for the device's engines, from their manifest's ``verification`` (written at export
    from the model's own files, so a copied engines folder verifies the same on any machine):
    finite-only for random weights (the test suite's models), else the envelope: VerifyConfig's
    bounds, with any the manifest's ``envelope`` overrides. A manifest without ``verification`` (an
    older export) gets the full default envelope."""
    v = manifest.verification
    if not v:
        return VerifyConfig()
    try:
        return VerifyConfig(**v["envelope"], statistics=bool(v["statistics"]))
    except (TypeError, ValueError) as e:
        raise ManifestFormatError(f"{manifest.root / MANIFEST_NAME}: verification {v!r} is not a VerifyConfig "
                                  f"({e}); rerun export: python export/build_engines.py") from None


def envelope(schedule: Schedule, k: int, config: VerifyConfig = VerifyConfig(),
             guidance_scale: float = 7.5) -> Envelope:
    """The bounds for latents after k steps of this schedule at this guidance (the same for every member)."""
    if not 0 <= k <= schedule.num_inference_steps:
        raise InputError(f"k={k} is outside the {schedule.num_inference_steps}-step schedule")
    g = float(guidance_scale)
    if not np.isfinite(g) or g < 0:
        raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    x0 = config.x0_rms_max * max(1.0, g / config.reference_guidance)
    alpha, sigma = float(schedule.alpha_t[k]), float(schedule.sigma_t[k])
    latent = config.margin * float(np.sqrt(alpha**2 * x0**2 + sigma**2))
    # prev_x0 was predicted at step k-1, from a guided noise estimate (at k = 0 there is none, and it
    # is not checked).
    noise_to_signal = float(schedule.sigma_t[k - 1] / schedule.alpha_t[k - 1]) if k > 0 else 0.0
    prev_x0 = config.margin * (x0 + config.eps_error_max * max(1.0, g) * noise_to_signal)
    return Envelope(latent_rms_max=latent, prev_x0_rms_max=prev_x0, peak=config.peak)


def _failures(name: str, x: np.ndarray, rms_max: float, peak: float, statistics: bool) -> list[str]:
    """Why a stacked [N, ...] tensor fails, per check; each row is judged by the same bounds."""
    x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    finite = np.isfinite(x).all(axis=1)
    if not statistics:
        return [] if finite.all() else [f"{name}: {int((~finite).sum())} member(s) hold NaN or infinity"]
    # Non-finite members get rms inf, so they fail every check below too.
    safe = np.where(np.isfinite(x), x, 0.0)
    rms = np.where(finite, np.sqrt(np.mean(safe**2, axis=1)), np.inf)
    top = np.where(finite, np.max(np.abs(safe), axis=1), np.inf)
    out = []
    if not finite.all():
        out.append(f"{name}: {int((~finite).sum())} member(s) hold NaN or infinity")
    bad_rms = finite & (rms > rms_max)
    if bad_rms.any():
        out.append(f"{name}: {int(bad_rms.sum())} member(s) with per-element rms above {rms_max:.3g} "
                   f"(largest {float(rms[bad_rms].max()):.3g})")
    bad_top = finite & (top > peak * rms_max)
    if bad_top.any():
        out.append(f"{name}: {int(bad_top.sum())} member(s) with a value beyond +-{peak * rms_max:.3g}")
    return out


def verify_answer(handoff: Handoff, schedule: Schedule, k: int, config: VerifyConfig = VerifyConfig(),
                  guidance_scale: float = 7.5) -> None:
    """Check every member's latent and prev_x0; raise VerificationError if any fails.

    Called for every answer before the device reads its own member. The checks,
    bounds and error text are identical for all members, so neither the
    outcome nor the message depends on which one is real.
    """
    if handoff.step_index != k:
        raise VerificationError(f"the cloud's answer is at step {handoff.step_index}, not at the k={k} asked for; "
                                "refusing the whole answer. Do not resend the same request.")
    env = envelope(schedule, k, config, guidance_scale)
    problems = _failures("latents", handoff.latents, env.latent_rms_max, env.peak, config.statistics)
    if k > 0:  # at k = 0 there is no previous data prediction to check
        problems += _failures("prev_x0", handoff.prev_x0, env.prev_x0_rms_max, env.peak, config.statistics)
    if problems:
        raise VerificationError(
            "the cloud's answer failed verification and was refused as a whole (" + "; ".join(problems)
            + "). The server is faulty or tampering; nothing from this answer was used. Do not resend the "
            "same request: report the server, and if you try again, do it later with a fresh seed.")
