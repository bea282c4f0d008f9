"""Image size -> latent shape, validated once for every model and engines folder.

The device engines, the onnxruntime cloud backend and the torch models each describe their sizes
as a ``LatentGeometry``; ``latent_shape`` refuses a size they cannot run with an InputError naming
the sizes they can. The device calls it before anything is sent, so a size it cannot finish never
reaches the cloud.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class LatentGeometry:
    channels: int                                  # latent channels
    vae_scale_factor: int                          # pixels per latent element, per side
    latent_multiple: int = 1                       # latent sides must be multiples of this
    size_range: tuple[int, int, int] | None = None  # pixels (min, max, multiple) dynamic graphs run; None: any
    fixed: tuple[int, int] | None = None           # latent (h, w) of graphs exported for one size only
    default_size: int | None = None                # pixels, named in messages
    source: str = "these engines"                  # whose sizes these are, for messages

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) for an image of ``height`` x ``width`` pixels, or an InputError."""
        f = self.vae_scale_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise InputError(f"image size {height}x{width} must be a positive multiple of {f} "
                             "(the VAE's downscale factor)")
        h, w = height // f, width // f
        m = self.latent_multiple
        if h % m or w % m:
            raise InputError(f"image size {height}x{width}: {self.source} need multiples of {m * f} px")
        if self.size_range is not None:
            lo, hi, mult = self.size_range
            example = f" (e.g. {self.default_size})" if self.default_size else ""
            for side in (height, width):
                if not lo <= side <= hi or side % mult:
                    raise InputError(f"image size {height}x{width}: {self.source} run heights and widths from "
                                     f"{lo} to {hi} pixels in steps of {mult}; choose --size in that range{example}")
        if self.fixed is not None and self.fixed != (h, w):
            fh, fw = self.fixed[0] * f, self.fixed[1] * f
            raise InputError(f"image size {height}x{width}: {self.source} were exported with a fixed size of "
                             f"{fh}x{fw} pixels; use --size {fh} or export engines with dynamic sizes")
        return (self.channels, h, w)
