"""Random in-plane affine augmentation of a batch (image and targets), batched on the tensors' device.

One affine per sample, composed in the study's order (docs/reproducing.md):
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
slices are rotated without shear. The image is sampled bilinearly (or with
nearest neighbour, ``image_interpolation = "nearest"``, as the study did) with
border padding. Every target moves by its own rule (``mtlbench.api.Target.warp``):
``"nearest"`` maps with nearest neighbour (values stay in their set),
``"linear"`` maps bilinearly, both with the target's ``fill`` where the
sample falls outside the slice; ``"points"`` (B, C, 2) (row, col) positions
are mapped by the same affine, exactly the inverse of the sampling grid, so a
point follows the content it marks; ``"none"`` targets are left alone.
Random numbers come from the given (CPU) generator, so a run is reproducible
whatever the device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mtlbench.api import Target
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


def _warp(x: torch.Tensor, grid: torch.Tensor, nearest: bool, fill: float = 0.0, padding: str = "zeros") -> torch.Tensor:
    """Sample (B, C, H, W) or (B, H, W) ``x`` at ``grid``; outside the slice ``fill`` (or border padding).

    Integer and bool tensors keep their dtype (nearest neighbour, rounded).
    """
    squeeze = x.dim() == 3
    if x.dim() not in (3, 4):
        raise ValueError(f"augmentation expects (B, H, W) or (B, C, H, W) tensors, got shape {tuple(x.shape)}")
    src = x[:, None] if squeeze else x
    if src.shape[1] == 0:
        return x
    floating = x.is_floating_point()
    work = src if floating else src.float()
    if fill and padding == "zeros":
        work = work - fill
    out = F.grid_sample(
        work, grid.to(work.dtype), mode="nearest" if nearest or not floating else "bilinear",
        padding_mode=padding, align_corners=False,
    )
    if fill and padding == "zeros":
        out = out + fill
    if not floating:
        out = out.round().to(x.dtype)
    return out[:, 0] if squeeze else out


def warp_points(points: torch.Tensor, theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Move (B, C, 2) (row, col) pixel positions the way the sampling grid of ``theta`` moves the content.

    ``theta`` (B, 2, 3) maps output to input in normalised coordinates; a
    point goes the other way, through its inverse. NaN stays NaN.
    """
    b = theta.shape[0]
    full = torch.zeros((b, 3, 3), dtype=torch.float64, device=theta.device)
    full[:, :2] = theta.to(torch.float64)
    full[:, 2, 2] = 1.0
    inv = torch.linalg.inv(full)[:, :2]  # input -> output
    p = points.to(torch.float64)
    xn = (2.0 * p[..., 1] + 1.0) / width - 1.0
    yn = (2.0 * p[..., 0] + 1.0) / height - 1.0
    hom = torch.stack([xn, yn, torch.ones_like(xn)], dim=-1)  # (B, C, 3)
    out = hom @ inv.transpose(1, 2).to(hom.device)  # (B, C, 2): x_n, y_n
    col = ((out[..., 0] + 1.0) * width - 1.0) / 2.0
    row = ((out[..., 1] + 1.0) * height - 1.0) / 2.0
    return torch.stack([row, col], dim=-1).to(points.dtype)


#: How the core's label map moves: nearest neighbour, background outside.
LABELS_RULE = Target("labels", 1, "int64", warp="nearest", fill=0.0)


def random_affine(
    image: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    rules: Mapping[str, Target],
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply one random affine per sample to ``image`` (B, C, H, W) and every target by its rule.

    ``rules[key]`` is the ``Target`` of ``targets[key]``. Map targets are
    (B, H, W) or (B, C, H, W) with the image's spatial size; points targets
    (B, C, 2); ``"none"`` targets any (B, ...). ``cfg.enabled`` False returns
    the inputs unchanged (no random numbers drawn); when every drawn transform
    is the identity (zero-width ranges at 0, 1, 0) the inputs are returned
    unchanged too.
    """
    if not cfg.enabled:
        return image, dict(targets)
    b, _, h, w = image.shape
    for key, value in targets.items():
        rule = rules[key]
        if value.shape[0] != b:
            raise ValueError(f"augmentation: target {key!r} has batch size {value.shape[0]}, the image {b}")
        if rule.warp in ("nearest", "linear") and (tuple(value.shape[-2:]) != (h, w) or value.dim() not in (3, 4)):
            raise ValueError(
                f"augmentation: target {key!r} of shape {tuple(value.shape)} does not match the image {(b, h, w)}"
            )
        if rule.warp == "points" and (value.dim() != 3 or value.shape[-1] != 2):
            raise ValueError(f"augmentation: points target {key!r} must be (B, C, 2), got {tuple(value.shape)}")
    params = draw_params(b, cfg, generator)
    if torch.equal(params, IDENTITY.expand(b, 4)):  # degenerate ranges: skip resampling (exact identity)
        return image, dict(targets)
    theta64 = affine_theta(params, h, w)
    theta = theta64.to(device=image.device, dtype=torch.float32)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    out_image = _warp(image, grid, nearest=cfg.image_interpolation == "nearest", padding="border")
    out_targets = {}
    for key, value in targets.items():
        rule = rules[key]
        if rule.warp in ("nearest", "linear"):
            out_targets[key] = _warp(value, grid, nearest=rule.warp == "nearest", fill=float(rule.fill))
        elif rule.warp == "points":
            out_targets[key] = warp_points(value, theta64.to(value.device), h, w)
        else:
            out_targets[key] = value
    return out_image, out_targets


__all__ = ["LABELS_RULE", "affine_theta", "draw_params", "random_affine", "warp_points"]
