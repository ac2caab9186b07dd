"""Random in-plane affine augmentation of a batch (image and targets), batched on the tensors' device.

One affine per sample, composed in the study's order (PROTOCOL.md, 2.2):
rotation, then isotropic scaling, then translation, each drawn uniformly from
the configured interval:

* rotation angle in degrees ~ U(``rotation_deg``). Positive angles turn the
  content counter-clockwise as an array is displayed with row 0 at the top,
  the way ``np.rot90(a, k=1)`` turns it (a 90 degree rotation of a square map
  equals ``np.rot90``). The centre of rotation is the image centre.
* scale ~ U(``scale``), the same for both axes (> 1 enlarges the content).
* translation per axis ~ U(``translation``) as a fraction of the image size
  on that axis (x by a fraction of W, y by a fraction of H; +x moves content
  to higher column indices, +y to higher row indices).

The transform is built in pixel units and converted to the normalised
coordinates of ``F.affine_grid`` (``align_corners=False``), so non-square
slices are rotated without shear. The image is sampled bilinearly with border
padding; integer targets (label maps) with nearest neighbour and zero padding
(labels stay in the original label set); floating targets (heatmaps)
bilinearly with zero padding. Random numbers come from the given (CPU)
generator, so a run is reproducible whatever the device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mtlbench.config import AugmentConfig


# angle 0, scale 1, no translation
IDENTITY = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)


def draw_params(batch: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, 4) float64 on the CPU: angle (degrees), scale, x-translation, y-translation (fractions)."""
    u = torch.rand((batch, 4), generator=generator, dtype=torch.float64)
    bounds = [cfg.rotation_deg, cfg.scale, cfg.translation, cfg.translation]
    lo = torch.tensor([b[0] for b in bounds], dtype=torch.float64)
    hi = torch.tensor([b[1] for b in bounds], dtype=torch.float64)
    return lo + (hi - lo) * u


def affine_theta(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) float64 ``affine_grid`` matrices (output -> input, normalised coords) for ``params``.

    Forward map in centred pixel coordinates (x = column, y = row, y down):
    p_out = s * R p_in + t with R = [[cos a, sin a], [-sin a, cos a]]
    (counter-clockwise as displayed). The sampler needs the inverse,
    p_in = R^T (p_out - t) / s, expressed in normalised units x_n = 2 x / W,
    y_n = 2 y / H.
    """
    angle = torch.deg2rad(params[:, 0])
    scale = params[:, 1]
    tx = params[:, 2] * width
    ty = params[:, 3] * height
    c, s = torch.cos(angle), torch.sin(angle)
    # inverse linear part R^T / scale, in pixel units
    inv = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2) / scale[:, None, None]
    d = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64)
    lin = d[None, :, None] * inv / d[None, None, :]  # D inv D^-1
    t = torch.stack([tx, ty], -1)  # (B, 2) pixels
    shift = -(inv @ t[:, :, None])[:, :, 0] * d[None, :]
    return torch.cat([lin, shift[:, :, None]], dim=2)


def _warp(x: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """Sample (B, C, H, W) or (B, H, W) ``x`` at ``grid``; integers/bools use nearest and keep their dtype."""
    squeeze = x.dim() == 3
    if x.dim() not in (3, 4):
        raise ValueError(f"augmentation expects (B, H, W) or (B, C, H, W) tensors, got shape {tuple(x.shape)}")
    src = x[:, None] if squeeze else x
    if x.is_floating_point():
        out = F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode=padding, align_corners=False)
    else:
        out = F.grid_sample(src.float(), grid.float(), mode="nearest", padding_mode="zeros", align_corners=False)
        out = out.round().to(x.dtype)
    return out[:, 0] if squeeze else out


def random_affine(
    image: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply one random affine per sample to ``image`` (B, C, H, W) and every target.

    Targets of shape (B, H, W) or (B, C, H, W) share the image's spatial size:
    integer ones (``labels``) are resampled with nearest neighbour and zero
    padding, floating ones (``heatmaps``) bilinearly with zero padding.
    ``cfg.enabled`` False returns the inputs unchanged (no random numbers drawn);
    when every drawn transform is the identity (zero-width ranges at 0, 1, 0)
    the inputs are returned unchanged too.
    """
    if not cfg.enabled:
        return image, dict(targets)
    b, _, h, w = image.shape
    for key, value in targets.items():
        if tuple(value.shape[-2:]) != (h, w) or value.shape[0] != b or value.dim() not in (3, 4):
            raise ValueError(
                f"augmentation: target {key!r} of shape {tuple(value.shape)} does not match the image {(b, h, w)}"
            )
    params = draw_params(b, cfg, generator)
    if torch.equal(params, IDENTITY.expand(b, 4)):  # degenerate ranges: skip resampling (exact identity)
        return image, dict(targets)
    theta = affine_theta(params, h, w).to(device=image.device, dtype=torch.float32)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    out_image = _warp(image, grid, "bilinear", "border")
    out_targets = {key: _warp(value, grid, "bilinear", "zeros") for key, value in targets.items()}
    return out_image, out_targets


__all__ = ["affine_theta", "draw_params", "random_affine"]
