"""Sparse coarse-to-fine inference: the finer scales of a VARMultiScale computed only where the
coarse scales see an emitter.

SMLM frames are sparse. After its token scales (the coarse grids under the transformer, computed on
the whole frame) the model knows where emitters can be, so the finer scales (the convolutional
:class:`~decode_var.nn.blocks.RefineStage` s and the fine levels of the encoder's top-down path that
only they read) need to run only on the cells around them:

1. **Active cells.** The coarse cells of the last token scale whose detection probability passes
   ``threshold``, on the finest grid, widened by ``ring`` finest cells (the 3 x 3 neighbourhood the
   post-processing reads around a detection, plus one cell of margin).
2. **What each layer must compute**, from the finest output back: a 3 x 3 convolution needs its
   input on its output cells widened by one cell; a map read from a coarser grid (nearest
   upsampling, as in the dense path) needs the coarse cells that contain the fine ones. Every layer is
   computed exactly on its cells, so on the active cells the maps equal the dense path's (to float
   rounding: a convolution here is a gather and a matrix product).
3. **Everywhere else** the finest map says "no emitter" (p = 0, offsets, photons, z 0) with the
   background of the last token scale, upsampled.

Cells are held as rows ``(P, C)`` of a :class:`Cells` set (flat indices into ``N * H * W`` of one
grid), never as dense maps; dense inputs (the encoder's down path, the token scales) are read where
needed. Training keeps the dense path; :func:`sparse_forward` is for the eval-mode forward only.

Tensors are indexed ``[..., x, y]`` like DECODE; sizes in cells of the grid at hand.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from decode_var.nn.blocks import RefineStage, _containing_cell, recentre

#: Coarse cells whose detection probability passes this are refined. Measured with the quickstart model on
#: its seeded test sets at 2 to 30 emitters per frame (docs/fitting.md, sparse inference).
DEFAULT_THRESHOLD = 0.1
#: Finest cells added around the active coarse cells: the post-processing's 3 x 3 neighbourhood + 1 margin.
DEFAULT_RING = 2
#: Cost of a sparse convolution per output cell, as a multiple of a dense (mkldnn) convolution's per pixel (a
#: gather of 9 neighbours and a matrix product). Fitted on this project's CPU (one thread) so that
#: :meth:`_Plan.cost_ratio` matches the measured time of the finer scales in whole fits of 256 x 256 px
#: frames with the quickstart model: sparse / dense 0.45, 0.9 and 1.65 at 1, 3 and 6 emitters per 40 x 40 px,
#: estimated 0.47, 0.92 and 1.48. Where the planned cells cost more than the dense finer scales,
#: :func:`sparse_forward` runs them dense.
SPARSE_COST = 2.9
#: Rows per matrix product of a sparse convolution (bounds the gathered patches to ~ 64 MB at 48 channels).
_CHUNK = 40_000

_ACTIVATIONS = (nn.ELU, nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


class Cells:
    """A set of cells of one grid ``(N, H, W)``: sorted flat indices into ``N * H * W``.

    Args:
        mask_NHW: bool, True on the cells of the set.
    """

    def __init__(self, mask_NHW: torch.Tensor):
        self.mask = mask_NHW
        self.shape = tuple(mask_NHW.shape)
        self.idx = mask_NHW.flatten().nonzero().flatten()
        self._lut: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.idx.numel()

    def lut(self) -> torch.Tensor:
        """(N * H * W,) long: the row of each cell, -1 where the cell is not in the set."""
        if self._lut is None:
            lut = torch.full((self.mask.numel(),), -1, dtype=torch.long, device=self.idx.device)
            lut[self.idx] = torch.arange(len(self), device=self.idx.device)
            self._lut = lut
        return self._lut

    def nij(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frame, x and y index of each cell, (P,) each."""
        _, H, W = self.shape
        n, rem = self.idx.div(H * W, rounding_mode="floor"), self.idx.remainder(H * W)
        return n, rem.div(W, rounding_mode="floor"), rem.remainder(W)


#: A map on a grid: dense ``(N, C, h, w)``, or ``(rows (P, C), cells)`` on some cells of it.
Field = Union[torch.Tensor, tuple]


def dilate(mask_NHW: torch.Tensor, r: int) -> torch.Tensor:
    """Cells within ``r`` cells (Chebyshev distance) of a True cell."""
    if r <= 0:
        return mask_NHW
    return F.max_pool2d(mask_NHW[:, None].float(), 2 * r + 1, stride=1, padding=r)[:, 0] > 0


def coarse_cells(mask_NHW: torch.Tensor, hw) -> torch.Tensor:
    """The cells of an (h, w) grid over the same extent that contain a True cell of ``mask_NHW``
    (the cells a nearest upsampling reads, :func:`decode_var.nn.blocks.upsample_cells`)."""
    N, H, W = mask_NHW.shape
    if (H, W) == tuple(hw):
        return mask_NHW
    ix, iy = _containing_cell(hw[0], H, mask_NHW.device), _containing_cell(hw[1], W, mask_NHW.device)
    n, i, j = mask_NHW.nonzero().unbind(1)
    out = torch.zeros((N, int(hw[0]), int(hw[1])), dtype=torch.bool, device=mask_NHW.device)
    out[n, ix[i], iy[j]] = True
    return out


def fine_cells(mask_Nhw: torch.Tensor, hw) -> torch.Tensor:
    """The cells of a finer (H, W) grid whose centre lies in a True cell of ``mask_Nhw``."""
    h, w = mask_Nhw.shape[-2:]
    ix, iy = _containing_cell(h, int(hw[0]), mask_Nhw.device), _containing_cell(w, int(hw[1]), mask_Nhw.device)
    return mask_Nhw.index_select(1, ix).index_select(2, iy)


def gather(field: Field, cells: Cells) -> torch.Tensor:
    """Rows (P, C) of ``field`` at ``cells``; a field on a coarser grid gives the values of the cells that
    contain them (nearest upsampling)."""
    N, H, W = cells.shape
    n, i, j = cells.nij()
    if isinstance(field, torch.Tensor):
        h, w = field.shape[-2:]
        rows = field.permute(0, 2, 3, 1).reshape(-1, field.shape[1])  # a view for channels-last maps
    else:
        rows, src = field
        h, w = src.shape[-2:]
    if (h, w) != (H, W):
        i, j = _containing_cell(h, H, i.device)[i], _containing_cell(w, W, j.device)[j]
    flat = (n * h + i) * w + j
    if isinstance(field, torch.Tensor):
        return rows.index_select(0, flat)
    at = src.lut()[flat]
    if bool((at < 0).any()):
        raise RuntimeError("sparse inference read a cell it did not compute (a bug in decode_var.nn.sparse)")
    return rows.index_select(0, at)


def linear(conv1x1: nn.Conv2d, rows_PC: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """A 1x1 convolution on rows."""
    w = conv1x1.weight.view(conv1x1.out_channels, -1)
    return F.linear(rows_PC, w, conv1x1.bias if bias else None)


def conv3x3(conv: nn.Conv2d, rows_PC: torch.Tensor, cells_in: Cells, cells_out: Cells) -> torch.Tensor:
    """A 3x3 convolution (stride 1, zero padding 1) on rows: output rows at ``cells_out`` from input rows
    at ``cells_in``, which must hold every in-grid neighbour of ``cells_out``."""
    N, H, W = cells_out.shape
    n, i, j = cells_out.nij()
    lut = cells_in.lut()
    zero_row = rows_PC.shape[0]
    nb = []
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            ii, jj = i + a, j + b
            inside = (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
            at = lut[(n * H + ii.clamp(0, H - 1)) * W + jj.clamp(0, W - 1)]
            if bool((inside & (at < 0)).any()):
                raise RuntimeError("sparse inference read a cell it did not compute (a bug in decode_var.nn.sparse)")
            nb.append(torch.where(inside, at, torch.full_like(at, zero_row)))
    nb_P9 = torch.stack(nb, dim=1)
    padded = torch.cat([rows_PC, rows_PC.new_zeros(1, rows_PC.shape[1])])
    w = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (out, 3 * 3 * in), (a, b, c) order
    out = rows_PC.new_empty(len(cells_out), conv.out_channels)
    for s in range(0, len(cells_out), _CHUNK):
        patches = padded.index_select(0, nb_P9[s:s + _CHUNK].flatten()).view(-1, w.shape[1])
        out[s:s + _CHUNK] = F.linear(patches, w, conv.bias)
    return out


def _is_plain_conv3x3(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _convs(seq: nn.Sequential) -> int:
    return sum(1 for m in seq if isinstance(m, nn.Conv2d))


def _run(seq: nn.Sequential, rows: torch.Tensor, cells: list) -> torch.Tensor:
    """``seq`` (3x3 convolutions and activations) on rows; ``cells[i]``: the cells before the i-th conv,
    ``cells[-1]`` the output cells."""
    c = 0
    for m in seq:
        if isinstance(m, nn.Conv2d):
            rows = conv3x3(m, rows, cells[c], cells[c + 1])
            c += 1
        else:
            rows = m(rows)
    return rows


def supports_sparse(model) -> bool:
    """Whether :func:`sparse_forward` can run ``model``: a coarse-to-fine model with token scales and finer
    conv stages built from plain 3x3 convolutions and activations, each on a grid at least as fine as the
    encoder level it reads."""
    if not getattr(model, "progressive", False) or not hasattr(model, "refine"):
        return False
    n_tok, factors = model.n_token_scales, model.schedule.factors
    if n_tok == 0 or n_tok == len(factors):
        return False
    seqs = [stage.body for stage in model.refine] + list(model.encoder.smooth)
    for seq in seqs:
        if not all(_is_plain_conv3x3(m) or isinstance(m, _ACTIVATIONS) for m in seq):
            return False
    # a stage reading a finer encoder level than its own grid would need an area mean
    return all(factors[k] >= 1.0 / 2 ** model._level[k] - 1e-9 for k in range(n_tok, len(factors)))


class _Plan:
    """The cells every layer of the finer scales must compute, from the finest active cells back."""

    def __init__(self, model, grids, level_hw, stop_level: int, active_NHW: torch.Tensor):
        K, n_tok = len(grids), model.n_token_scales
        self.stage: dict[int, list[Cells]] = {}
        need: dict[int, torch.Tensor] = {K - 1: active_NHW}
        level_need: dict[int, torch.Tensor] = {}
        for k in range(K - 1, n_tok - 1, -1):
            if k not in need:
                continue
            stage: RefineStage = model.refine[k - n_tok]
            n_conv = _convs(stage.body)
            masks = [dilate(need[k], n_conv - c) for c in range(n_conv + 1)]
            self.stage[k] = [Cells(m) for m in masks]
            lvl = model._level[k]
            if lvl < stop_level:
                want = coarse_cells(masks[0], level_hw[lvl])
                level_need[lvl] = want if lvl not in level_need else level_need[lvl] | want
            if stage.conditioned and k - 1 >= n_tok:
                need[k - 1] = coarse_cells(masks[0], grids[k - 1])
        self.level: dict[int, list[Cells]] = {}
        for lvl in range(stop_level):  # fine to coarse: a level's needs add to the next coarser one's
            if lvl not in level_need:
                continue
            n_conv = _convs(model.encoder.smooth[lvl])
            masks = [dilate(level_need[lvl], n_conv - c) for c in range(n_conv + 1)]
            self.level[lvl] = [Cells(m) for m in masks]
            if lvl + 1 < stop_level:
                want = coarse_cells(masks[0], level_hw[lvl + 1])
                level_need[lvl + 1] = want if lvl + 1 not in level_need else level_need[lvl + 1] | want

    def cost_ratio(self, model) -> float:
        """Estimated time of the planned sparse convolutions / that of the same layers dense."""
        sparse_ops = dense_ops = 0.0
        seqs = [(model.refine[k - model.n_token_scales].body, c) for k, c in self.stage.items()]
        seqs += [(model.encoder.smooth[lvl], c) for lvl, c in self.level.items()]
        for seq, cells in seqs:
            convs = [m for m in seq if isinstance(m, nn.Conv2d)]
            for conv, out_cells in zip(convs, cells[1:]):
                per_cell = conv.in_channels * conv.out_channels
                sparse_ops += SPARSE_COST * len(out_cells) * per_cell
                dense_ops += out_cells.mask.numel() * per_cell
        return sparse_ops / max(dense_ops, 1.0)


def _fine_levels(model, enc: list, feats: list, plan: _Plan, stop_level: int) -> None:
    """The encoder's top-down levels finer than ``stop_level``, on their planned cells (into ``feats``)."""
    for lvl in range(stop_level - 1, -1, -1):
        if lvl not in plan.level:
            continue
        cells = plan.level[lvl]
        top = linear(model.encoder.lateral[lvl], gather(feats[lvl + 1], cells[0]))
        x = gather(enc[lvl], cells[0]) + top
        feats[lvl] = (_run(model.encoder.smooth[lvl], x, cells), cells[-1])


def _stage_input(model, k: int, cells: Cells, feats: list, prev_hidden: Field, prev_src: Field, grids) -> torch.Tensor:
    """The input rows of refine stage ``k`` at ``cells``: encoder features + (conditioned) the coarser
    scale's hidden state and re-centred map, as :meth:`RefineStage.forward` sums them."""
    stage: RefineStage = model.refine[k - model.n_token_scales]
    x = linear(stage.from_feat, gather(feats[model._level[k]], cells))
    if not stage.conditioned:
        return x
    cell_prev, cell_k = model.schedule[k - 1].cell_size, model.schedule[k].cell_size
    h, w = grids[k - 1]
    src = gather(prev_src, cells)
    # recentre's two terms: the map in fine cells from the coarse centre, and the centre shift
    shift_16HW = recentre(src.new_zeros(1, 6, h, w), grids[k], cell_prev, cell_k)[1]
    scale_6 = torch.tensor([1.0, 1.0, cell_prev[0] / cell_k[0], cell_prev[1] / cell_k[1], 1.0, 1.0],
                           dtype=src.dtype, device=src.device)
    coarse = linear(stage.from_prev, gather(prev_hidden, cells)) + linear(stage.from_map, src * scale_6)
    _, i, j = cells.nij()
    shift_P6 = shift_16HW[0].permute(1, 2, 0)[i, j]
    return x + coarse + linear(stage.from_map, shift_P6, bias=False)


def _head_rows(model, k: int, hidden_PC: torch.Tensor) -> torch.Tensor:
    return model._head(k, hidden_PC.t()[None, :, :, None])[0, :, :, 0].t()


def _finest_map(model, raw_PC: torch.Tensor, cells: Cells, coarse_raw_N6hw: torch.Tensor) -> torch.Tensor:
    """The eval-mode finest map: the computed cells, and elsewhere no emitter on the coarse background."""
    N, H, W = cells.shape
    C = raw_PC.shape[1]
    base = raw_PC.new_zeros(N, H, W, C)
    base[..., 0] = float("-inf")  # p = sigmoid(-inf) = 0 exactly
    bg_Nhw = coarse_raw_N6hw[:, -1]
    ix = _containing_cell(bg_Nhw.shape[-2], H, bg_Nhw.device)
    iy = _containing_cell(bg_Nhw.shape[-1], W, bg_Nhw.device)
    base[..., 5] = bg_Nhw.index_select(1, ix).index_select(2, iy)  # [p, phot, x, y, z, bg, (sigmas)]
    base.view(-1, C)[cells.idx] = raw_PC
    return model.eval_output(base.permute(0, 3, 1, 2))


@torch.no_grad()
def sparse_forward(model, frames_NCHW: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                   ring: Optional[int] = None, max_cost: float = 1.0, stats: Optional[dict] = None) -> torch.Tensor:
    """The eval-mode output of ``model`` (``(N, C, H', W')`` of its finest scale, p in [0, 1]) with the
    finer scales computed only around the coarse cells whose p passes ``threshold`` (module docstring).

    Args:
        model: a VARMultiScale in eval mode for which :func:`supports_sparse` holds.
        frames_NCHW: network input, as the dense forward takes it.
        threshold: detection probability of a cell of the last token scale above which it is refined.
        ring: finest cells added around the refined region (default :data:`DEFAULT_RING`).
        max_cost: the finer scales run dense where the planned sparse cells are estimated to cost at
            least this share of the dense finer scales (1: whichever is faster; ``inf``: always sparse).
        stats: a dict that receives ``path`` ('sparse', or 'dense' where the planned cells would cost more
            than the dense finer scales, :data:`SPARSE_COST`), ``cost_ratio`` (that estimate),
            ``active_share``, the share of finest cells computed (of the padded grid), ``computed_NHW``,
            those cells, and ``active_NHW``, the finest cells of the coarse cells that passed the
            threshold (bool, on the output grid).
    """
    model._check_frames(frames_NCHW)
    K, n_tok = len(model.schedule), model.n_token_scales
    shape = tuple(frames_NCHW.shape[-2:])
    if model._out_shape(K - 1, shape) is None:
        raise model._size_error(shape, [K - 1])
    padded = model.padded_shape(shape)
    grids = [model._out_shape(k, padded) for k in range(K)]
    size = model._out_shape(K - 1, shape)
    x = F.pad(frames_NCHW, (0, padded[1] - shape[1], 0, padded[0] - shape[0]))
    enc = model.encoder.bottom_up(x)
    stop_level = min(model._level[k] for k in range(n_tok))
    feats: list = model.encoder.top_down(enc, stop_level)
    outs: list = []
    hidden = model._predict_token_scales(n_tok, feats, grids, None, None, outs, x.shape[0], x.device)
    active = fine_cells(torch.sigmoid(outs[-1][:, 0]) > threshold, grids[K - 1])
    plan = _Plan(model, grids, [e.shape[-2:] for e in enc], stop_level,
                 dilate(active, DEFAULT_RING if ring is None else int(ring)))
    stats = {} if stats is None else stats
    stats.update(cost_ratio=plan.cost_ratio(model), active_NHW=active[:, :size[0], :size[1]])
    if stats["cost_ratio"] >= max_cost:  # too many emitters for the sparse path to pay: the dense finer scales
        stats.update(path="dense", active_share=1.0,
                     computed_NHW=torch.ones((x.shape[0],) + size, dtype=torch.bool, device=x.device))
        model._refine_scales(n_tok, K, model.encoder.top_down(enc, 0, feats), grids, hidden, outs)
        return model.eval_output(outs[-1][..., :size[0], :size[1]])
    finest = plan.stage[K - 1][-1]
    if len(finest) == 0:  # no coarse cell sees an emitter: no emitter anywhere
        width = model.refine[-1].width
        raw = model._head(K - 1, x.new_zeros(1, width, 1, 1))[:, :, 0, 0][:0]
    else:
        _fine_levels(model, enc, feats, plan, stop_level)
        raw, finest = _sparse_scales(model, plan, feats, hidden, outs[-1], grids)
    stats.update(path="sparse", active_share=len(finest) / max(1, finest.mask.numel()),
                 computed_NHW=finest.mask[:, :size[0], :size[1]])
    return _finest_map(model, raw, finest, outs[-1])[..., :size[0], :size[1]]


def _sparse_scales(model, plan: _Plan, feats: list, hidden, coarse_raw_N6hw, grids) -> tuple:
    """(raw rows of the finest scale, its cells): the refine stages on their planned cells, coarse to fine."""
    n_tok = model.n_token_scales
    prev_hidden = hidden
    prev_src = model.eval_output(coarse_raw_N6hw)  # p through a sigmoid, as the dense path conditions
    raw = None
    for k in range(n_tok, len(grids)):
        if k not in plan.stage:
            continue
        cells = plan.stage[k]
        x = _stage_input(model, k, cells[0], feats, prev_hidden, prev_src, grids)
        rows = _run(model.refine[k - n_tok].body, x, cells)
        raw = _head_rows(model, k, rows)
        prev_hidden, prev_src = (rows, cells[-1]), (model.eval_output(raw), cells[-1])
    return raw, plan.stage[len(grids) - 1][-1]
