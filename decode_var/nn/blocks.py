"""Building blocks of :class:`decode_var.nn.model.VARMultiScale`.

- :class:`FrameEncoder`: a shared convolutional encoder with a top-down (FPN) path; one feature
  map per stride 1, 2, 4, each with context from the coarser ones.
- :class:`ScaleTransformer`: pre-LN transformer blocks over the tokens of the coarse scales, with
  windowed, block-causal attention: a token of scale ``k`` attends to the tokens of scales
  ``<= k`` (``next_scale``) or of scale ``k`` only (``independent``) inside its window. It runs
  either all scales at once under an explicit mask (teacher forcing, VAR's training mode) or one
  scale after the other with a key/value cache (free running, VAR's inference mode); the two give
  the same result.
- :class:`RefineStage`: convolutions on one finer (or super-resolved) grid, fed by encoder
  features, the upsampled hidden state of the next-coarser scale and its 6-channel map.
- :func:`recentre` / :func:`recentre_upsample`: a coarse 6-channel map on a finer grid, with the
  x, y offsets converted from coarse cells (from the coarse cell centre) to fine cells (from the
  fine cell centre): the one place where a map changes grid inside the model.

Tensors are indexed ``[..., x, y]`` like DECODE. Sizes are in cells of the grid at hand.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)


def resample(feat_NChw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Area mean onto a coarser grid, nearest cell onto a finer one, identity on the same grid."""
    size = (int(size[0]), int(size[1]))
    h, w = feat_NChw.shape[-2:]
    if (h, w) == size:
        return feat_NChw
    if size[0] <= h and size[1] <= w:
        return F.adaptive_avg_pool2d(feat_NChw, size)
    return F.interpolate(feat_NChw, size=size, mode="nearest-exact")


def _containing_cell(n_coarse: int, n_fine: int, device) -> torch.Tensor:
    """Index of the coarse cell that holds the centre of each fine cell (both grids span one extent)."""
    centres = (torch.arange(n_fine, device=device, dtype=torch.float64) + 0.5) * (n_coarse / n_fine)
    return centres.floor().long().clamp_(0, n_coarse - 1)


def upsample_cells(map_NChw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-cell upsampling: every fine cell of ``size`` takes the coarse cell its centre lies in."""
    h, w = map_NChw.shape[-2:]
    if int(size[0]) % h == 0 and int(size[1]) % w == 0:  # whole ratios: the same cells, a faster kernel
        return F.interpolate(map_NChw, size=(int(size[0]), int(size[1])), mode="nearest")
    ix = _containing_cell(h, int(size[0]), map_NChw.device)
    iy = _containing_cell(w, int(size[1]), map_NChw.device)
    return map_NChw.index_select(-2, ix).index_select(-1, iy)


def recentre(map_N6hw: torch.Tensor, size: Sequence[int], cell_coarse_px: Sequence[float],
             cell_fine_px: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversion of a coarse 6-channel map ``[p, phot, x, y, z, bg]`` to a finer grid's units.

    On the coarse grid the x, y offsets are in coarse cells from the coarse cell centre; on the fine
    grid they must be in fine cells from the fine cell centre (the network units of
    :class:`~decode_var.data.targets.TargetRescale` on each scale). For each axis::

        offset_fine = offset_coarse * cell_coarse_px / cell_fine_px
                      + (centre_coarse_px - centre_fine_px) / cell_fine_px

    so that the position a fine cell points at (its centre + its offset) is the one its coarse cell
    pointed at: upsampling never moves an emitter. p (per coarse cell), phot / phot_max,
    z / z_max and bg / bg_max are the same units on every grid and are copied.

    The result comes as two terms, ``upsample_cells(coarse_N6hw, size) + shift_16HW``
    (:func:`recentre_upsample`): the first term still lives on the coarse grid, so a 1x1
    projection of it can run there (:class:`RefineStage`), and the second depends on the grids only.

    Args:
        map_N6hw: (N, 6, h, w) coarse map, x, y offsets in cells of the coarse grid.
        size: fine grid ``(H, W)`` in cells; both grids start at the same edge.
        cell_coarse_px, cell_fine_px: cell size ``(along x, along y)`` in input px
            (:attr:`decode_var.core.scales.Scale.cell_size`, ``1 / factor`` on the default extent);
            a single number means the same along both axes.

    Returns:
        ``coarse_N6hw``: the map with x, y offsets in fine cells (from the coarse cell centre);
        ``shift_16HW``: (1, 6, H, W), zero but for x, y: coarse minus fine cell centre in fine cells.
    """
    h, w = map_N6hw.shape[-2:]
    H, W = int(size[0]), int(size[1])
    cc_x, cc_y = _pair(cell_coarse_px)
    cf_x, cf_y = _pair(cell_fine_px)
    scale_6 = torch.tensor([1.0, 1.0, cc_x / cf_x, cc_y / cf_y, 1.0, 1.0], dtype=map_N6hw.dtype,
                           device=map_N6hw.device)
    coarse_N6hw = map_N6hw * scale_6[None, :, None, None]
    ix = _containing_cell(h, H, map_N6hw.device)
    iy = _containing_cell(w, W, map_N6hw.device)
    # centre of the coarse cell minus centre of the fine cell, in input px (float64: exact for dyadic grids)
    shift_x = (ix.double() + 0.5) * cc_x - (torch.arange(H, device=ix.device, dtype=torch.float64) + 0.5) * cf_x
    shift_y = (iy.double() + 0.5) * cc_y - (torch.arange(W, device=iy.device, dtype=torch.float64) + 0.5) * cf_y
    shift_16HW = torch.zeros(1, 6, H, W, dtype=map_N6hw.dtype, device=map_N6hw.device)
    shift_16HW[0, 2] = (shift_x / cf_x).to(map_N6hw.dtype)[:, None]
    shift_16HW[0, 3] = (shift_y / cf_y).to(map_N6hw.dtype)[None, :]
    return coarse_N6hw, shift_16HW


def recentre_upsample(map_N6hw: torch.Tensor, size: Sequence[int],
                      cell_coarse_px: Sequence[float], cell_fine_px: Sequence[float]) -> torch.Tensor:
    """A coarse 6-channel map on a finer grid, in the fine grid's units (see :func:`recentre`).

    Args and units as :func:`recentre`. Returns (N, 6, H, W), x, y offsets in cells of the fine grid.
    """
    coarse_N6hw, shift_16HW = recentre(map_N6hw, size, cell_coarse_px, cell_fine_px)
    return upsample_cells(coarse_N6hw, size) + shift_16HW


def _pair(v) -> tuple[float, float]:
    if isinstance(v, (int, float)):
        return float(v), float(v)
    return float(v[0]), float(v[1])


# --------------------------------------------------------------------------------- encoder
class FrameEncoder(nn.Module):
    """Conv encoder over the frame window with a top-down path (a small FPN).

    Level ``l`` has stride ``2 ** l`` and ``features * 2 ** l`` channels. After the top-down pass
    every level carries context from all coarser ones, so every scale head sees a large receptive
    field whatever the conditioning mode.

    Args:
        channels_in: frames in the window (1 or 3), stacked as channels.
        features: channels at stride 1.
        n_levels: 1..3 (strides 1, 2, 4).
        activation: module class for the non-linearity.
    """

    def __init__(self, channels_in: int, features: int, n_levels: int, activation: type[nn.Module]):
        super().__init__()
        self.widths = [features * 2 ** lvl for lvl in range(n_levels)]
        self.down = nn.ModuleList()
        c_prev = channels_in
        for lvl, c in enumerate(self.widths):
            self.down.append(nn.Sequential(conv3x3(c_prev, c, stride=1 if lvl == 0 else 2), activation(),
                                           conv3x3(c, c), activation()))
            c_prev = c
        # top-down: level l += upsampled 1x1 projection of level l+1, then one 3x3 conv
        self.lateral = nn.ModuleList(nn.Conv2d(self.widths[lvl + 1], self.widths[lvl], 1)
                                     for lvl in range(n_levels - 1))
        self.smooth = nn.ModuleList(nn.Sequential(conv3x3(self.widths[lvl], self.widths[lvl]), activation())
                                    for lvl in range(n_levels - 1))

    @property
    def stride(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, frames_NCHW: torch.Tensor) -> list[torch.Tensor]:
        return self.top_down(self.bottom_up(frames_NCHW))

    def bottom_up(self, frames_NCHW: torch.Tensor) -> list[torch.Tensor]:
        """The down path: one map per level, before the top-down pass."""
        enc = []
        x = frames_NCHW
        for block in self.down:
            x = block(x)
            enc.append(x)
        return enc

    def top_down(self, enc: list[torch.Tensor], stop_level: int = 0,
                 out: Optional[list] = None) -> list[Optional[torch.Tensor]]:
        """The top-down pass from the coarsest level down to ``stop_level``; finer levels are None (the
        sparse inference path, :mod:`decode_var.nn.sparse`, computes them only where it needs them).
        ``out``: levels already computed (a previous call's result), continued in place."""
        out = [None] * len(enc) if out is None else out
        out[-1] = enc[-1]
        for lvl in range(len(enc) - 2, stop_level - 1, -1):
            if out[lvl] is not None:
                continue
            top = F.interpolate(self.lateral[lvl](out[lvl + 1]), size=enc[lvl].shape[-2:], mode="nearest")
            out[lvl] = self.smooth[lvl](enc[lvl] + top)
        return out


# ------------------------------------------------------------------------------ attention
class WindowLayout:
    """Partition of the token grids of the coarse scales into aligned attention windows.

    The coarsest token grid ``(g0x, g0y)`` is cut into ``n_w`` windows per axis of ``win0`` cells
    (``n_w = ceil(g0 / window)``, ``win0 = ceil(g0 / n_w)``: at most ``window`` cells, balanced so
    that padding is minimal). Scale ``k`` has ``ratio_k`` times as many cells per axis, and its
    window is ``win0 * ratio_k`` cells wide, so the windows of all scales cover the same patch of
    the frame. Padding cells (at the high-x / high-y border) are masked out as keys.
    """

    def __init__(self, grid0: Sequence[int], ratios: Sequence[int], window: int, device,
                 win0: Optional[Sequence[int]] = None):
        self.grid0 = (int(grid0[0]), int(grid0[1]))
        self.ratios = [int(r) for r in ratios]
        if win0 is None:
            win0 = self.balanced_window(self.grid0, window)
        # windows of a fixed size tile any grid from the origin: a frame larger than the training
        # frame is cut into the same windows as training tiles aligned with them
        self.win0 = tuple(max(1, min(int(w), g)) for w, g in zip(win0, self.grid0))
        self.n_w = tuple(math.ceil(g / w) for g, w in zip(self.grid0, self.win0))
        self.n_windows = self.n_w[0] * self.n_w[1]
        self.padded = any(n * w != g for n, w, g in zip(self.n_w, self.win0, self.grid0))
        self._valid = []
        for r in self.ratios:
            gx, gy = self.grid0[0] * r, self.grid0[1] * r
            ones = torch.ones(1, 1, gx, gy, device=device)
            self._valid.append(self.partition(ones, r)[..., 0] > 0.5)  # (n_windows, L_k)

    @staticmethod
    def balanced_window(grid0: Sequence[int], window: int) -> tuple[int, int]:
        """``win0``: at most ``window`` cells per axis, balanced so that padding is minimal."""
        n_w = [max(1, math.ceil(int(g) / window)) for g in grid0]
        return tuple(math.ceil(int(g) / n) for g, n in zip(grid0, n_w))

    def window_shape(self, ratio: int) -> tuple[int, int]:
        return self.win0[0] * ratio, self.win0[1] * ratio

    def partition(self, grid_NDhw: torch.Tensor, ratio: int) -> torch.Tensor:
        """(N, D, h, w) grid -> (N * n_windows, L, D) tokens, window by window."""
        N, D, h, w = grid_NDhw.shape
        wx, wy = self.window_shape(ratio)
        nx, ny = self.n_w
        grid = F.pad(grid_NDhw, (0, ny * wy - w, 0, nx * wx - h))
        grid = grid.view(N, D, nx, wx, ny, wy).permute(0, 2, 4, 3, 5, 1)
        return grid.reshape(N * nx * ny, wx * wy, D)

    def merge(self, tokens_BLD: torch.Tensor, ratio: int, N: int) -> torch.Tensor:
        """Inverse of :meth:`partition`: (N * n_windows, L, D) -> (N, D, h, w), padding dropped."""
        D = tokens_BLD.shape[-1]
        wx, wy = self.window_shape(ratio)
        nx, ny = self.n_w
        grid = tokens_BLD.reshape(N, nx, ny, wx, wy, D).permute(0, 5, 1, 3, 2, 4)
        grid = grid.reshape(N, D, nx * wx, ny * wy)
        return grid[:, :, :self.grid0[0] * ratio, :self.grid0[1] * ratio]

    def key_mask(self, scales: Sequence[int], N: int) -> Optional[torch.Tensor]:
        """(N * n_windows, 1, 1, L_keys) bool, True = real cell; None when nothing is padded."""
        if not self.padded:
            return None
        valid = torch.cat([self._valid[k] for k in scales], dim=1)
        return valid.repeat(N, 1)[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention whose keys may be prefixed with cached keys of coarser scales."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"token_dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD, prefix_kv=None, attn_mask=None):
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if prefix_kv is not None:
            k_all = torch.cat([prefix_kv[0], k], dim=2)
            v_all = torch.cat([prefix_kv[1], v], dim=2)
        else:
            k_all, v_all = k, v
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D)), (k, v)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x_BLD, prefix_kv=None, attn_mask=None):
        a, kv = self.attn(self.norm1(x_BLD), prefix_kv, attn_mask)
        x_BLD = x_BLD + a
        return x_BLD + self.mlp(self.norm2(x_BLD)), kv


class ScaleTransformer(nn.Module):
    """Transformer over the tokens of the coarse scales, windowed and block-causal.

    Args:
        dim: token width.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        causal: True (next_scale): scale k sees scales <= k; False (independent): scale k only.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.trunc_normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        # residual branches start small so that the stack starts near the identity (GPT-2 init)
        for blk in self.blocks:
            blk.attn.proj.weight.data.mul_(1 / math.sqrt(2 * depth))
            blk.mlp[2].weight.data.mul_(1 / math.sqrt(2 * depth))

    def block_mask(self, lengths: Sequence[int], device) -> torch.Tensor:
        """(L, L) bool, True where a query (row) may attend to a key (column): VAR's
        ``attn_bias_for_masking`` as a boolean, with scale ids in place of VAR's levels."""
        lvl = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])
        return (lvl[:, None] >= lvl[None, :]) if self.causal else (lvl[:, None] == lvl[None, :])

    def forward_parallel(self, tokens: list[torch.Tensor], layout: WindowLayout, N: int) -> list[torch.Tensor]:
        """All scales at once under the block mask. tokens[k]: (N * n_windows, L_k, D)."""
        lengths = [t.shape[1] for t in tokens]
        x = torch.cat(tokens, dim=1)
        mask = self.block_mask(lengths, x.device)[None, None]
        keys = layout.key_mask(range(len(tokens)), N)
        if keys is not None:
            mask = mask & keys
        for blk in self.blocks:
            x, _ = blk(x, attn_mask=mask)
        return list(self.norm(x).split(lengths, dim=1))

    def start_cache(self) -> list[list]:
        return [[] for _ in self.blocks]

    def forward_step(self, tokens_k: torch.Tensor, k: int, cache: list[list], layout: WindowLayout,
                     N: int) -> torch.Tensor:
        """One scale; keys/values of coarser scales come from ``cache`` (updated in place)."""
        x = tokens_k
        scales = list(range(k + 1)) if self.causal else [k]
        mask = layout.key_mask(scales, N)
        for blk, kv_list in zip(self.blocks, cache):
            prefix = None
            if self.causal and kv_list:
                prefix = (torch.cat([kv[0] for kv in kv_list], dim=2), torch.cat([kv[1] for kv in kv_list], dim=2))
            x, kv = blk(x, prefix_kv=prefix, attn_mask=mask)
            kv_list.append(kv)
        return self.norm(x)


# -------------------------------------------------------------------------------- refine
class RefineStage(nn.Module):
    """Convolutions on one grid finer than the token scales.

    Input: the encoder features, plus (``conditioned``) the hidden state of the next-coarser
    scale and its 6-channel map re-centred on this grid (:func:`recentre`), each through a 1x1
    projection. A 1x1 projection commutes with nearest upsampling and with area means, so every
    projection runs on the grid its input lives on and one upsampling follows (the fine grid sees
    the same sum as projecting the upsampled inputs, at a fraction of the cost):
    ``from_map(recentre_upsample(m)) = upsample(from_map(coarse_m)) + W_map * shift``.
    """

    def __init__(self, c_feat: int, c_prev: Optional[int], width: int, conditioned: bool,
                 activation: type[nn.Module]):
        super().__init__()
        self.conditioned = conditioned and c_prev is not None
        self.width = width
        self.from_feat = nn.Conv2d(c_feat, width, 1)
        if self.conditioned:
            self.from_prev = nn.Conv2d(c_prev, width, 1)
            self.from_map = nn.Conv2d(6, width, 1)
        self.body = nn.Sequential(activation(), conv3x3(width, width), activation(), conv3x3(width, width),
                                  activation())

    def forward(self, feat_NCfg, size: Sequence[int], prev_hidden_NCgh=None, coarse_N6gh=None,
                shift_16HW=None):
        """Hidden state (N, width, H, W) on the grid ``size``.

        Args:
            feat_NCfg: encoder features on their own grid (resampled to ``size`` after the projection).
            size: this stage's grid ``(H, W)`` in cells.
            prev_hidden_NCgh: hidden state of scale k-1 on its grid.
            coarse_N6gh, shift_16HW: scale k-1's map as :func:`recentre` returns it for this grid.
        """
        x = resample(self.from_feat(feat_NCfg), size)
        if self.conditioned:
            coarse = self.from_prev(prev_hidden_NCgh) + self.from_map(coarse_N6gh)
            shift = F.conv2d(shift_16HW, self.from_map.weight)  # no bias: it is in the coarse term
            x = x + upsample_cells(coarse, size) + shift
        return self.body(x)
