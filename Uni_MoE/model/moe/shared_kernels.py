"""Triton kernels for the shared-base block: every slot's SwiGLU with its r-wide LoRA terms, mixed in registers.

Tokens are sorted by the experts of all their slots together (``combo_grouping``), so each program owns up
to BLOCK_M tokens that chose the same expert in every slot, and each slot's LoRA factors are one matrix
per tile: the r-wide products are ``tl.dot``s on registers, as in swiglu_lora_kernels.py. Rows stay in
token order in memory (the kernels load them through the sort permutation), so the dense base GEMMs
need no gathered copy.

- ``mix_forward``: h_j = silu(gate + s zg_j Bg^T) * (up + s zu_j Bu^T) for each slot j, ``mixed`` =
  sum_j w_j h_j (one [T, I] write, for the single down GEMM) and zd_j = dropout(h_j) Ad^T;
- ``mix_backward``: sum_j d gate_j and sum_j d up_j (for the base input gradient), the gate/up LoRA
  input gradients s dg_j Bg and s du_j Bu, and <h_j, d mixed> for the routing-weight gradient; from rank
  SLOT_ROWS_MIN_RANK it also stores each slot's d gate, d up and dropout(h) in expert order, the LoRA input
  gradients are grouped GEMMs over them instead, and the LoRA weight gradients per-expert products over them
  (shared.py, rank_grad_kernels.py);
- ``lora_weight_grads`` (lower ranks): per expert and block of I columns, over that expert's slots (sorted by
  expert), the LoRA weight gradients accumulated in registers: no per-slot [T, I] tensor reaches memory.

Top-1 and top-2 only (``supported``); the PyTorch path in shared.py covers the rest and the CPU.
"""

from __future__ import annotations

import torch

from .lora_blocks import slot_pairs
from .segments import SlotGrouping, group_slots, segment_mm
from .swiglu_lora_kernels import (_INTERPRET, BLOCK_M, _block_r, _precision, _split, available, tile_schedule,
                                  triton)

MAX_COMBOS = 1024  # E**k tile groups; beyond that the schedule's spare tiles outweigh the work
# From this rank the backward kernel stores each slot's rows for the weight-gradient products: 5.5-7.3 % faster
# steps at r = 64, level at r = 32, 3-8 % slower at r = 8-16, for a peak that grows by 3 [S, I]
# (shared_wgrad_h200.md).
SLOT_ROWS_MIN_RANK = 64


def supported(x: torch.Tensor, top_k: int, num_experts: int) -> bool:
    """Whether the kernels run this block: CUDA (or the interpreter), top-1/top-2, a bounded E**k, tokens."""
    return available(x) and top_k in (1, 2) and num_experts**top_k <= MAX_COMBOS and x.shape[0] > 0


def slot_rows_pay(rank: int) -> bool:
    """Whether the LoRA weight and input gradients at this rank come from products over rows the backward kernel
    stores per slot (3 [S, I] tensors more in memory), rather than from the kernel that recomputes them and from
    the backward kernel itself."""
    return rank >= SLOT_ROWS_MIN_RANK


def combo_grouping(indices: torch.Tensor, num_experts: int) -> tuple[SlotGrouping, torch.Tensor]:
    """Tokens sorted by their experts' combination c = sum_j e_j E**j, and the tile schedule over combinations."""
    powers = num_experts ** torch.arange(indices.shape[1], device=indices.device)
    combos = (indices * powers).sum(1, keepdim=True)
    g = group_slots(combos, num_experts ** indices.shape[1])
    return g, tile_schedule(g.counts, g.offs, indices.shape[0])


if triton is not None:
    import triton.language as tl

    from .swiglu_lora_kernels import _PRUNE, configs, scheduled_tile

    _FORWARD_CONFIGS = configs(((32, 8, 3), (64, 8, 3), (32, 4, 3), (32, 8, 1)),
                               capped=((16, 4, 1), (32, 4, 1), (16, 4, 2), (32, 4, 2)))
    _BACKWARD_CONFIGS = configs(((32, 8, 3), (64, 8, 3), (32, 8, 1)), capped=((16, 4, 1), (32, 4, 1), (16, 4, 2)))
    # 32 columns: every weight-gradient product is [32, M] x [M, r], which Triton (3.6) gives to mma.sync. Its
    # wgmma lowering of the r >= 64 products read past the kernel's shared memory (compute-sanitizer, SM90).
    _GRAD_CONFIGS = configs(((32, 8, 3, 64), (32, 4, 3, 32)), single=(32, 4, 1, 32),
                            capped=((32, 4, 1, 64), (32, 4, 2, 64), (32, 4, 1, 32)))

    @triton.jit
    def _r_tile(ptr, e, cols, col_ok, rk, r_ok, rank, n_cols: tl.constexpr):
        """[R, N] tile of expert e's r-wide factor stored [E, r, I]: LoRA-A as it is, LoRA-B as
        ``factor_layout.kernel_factors`` gives it (B[e]^T)."""
        return tl.load(ptr + e * rank * n_cols + rk[:, None] * n_cols + cols[None, :],
                       mask=r_ok[:, None] & col_ok[None, :], other=0.0)

    @triton.jit
    def _z_tile(ptr, tok, block, width, rk, z_mask):
        """[M, R] r-wide activations of rows ``tok`` at column block ``block`` of a [T, width] tensor."""
        return tl.load(ptr + tok[:, None] * width + block + rk[None, :], mask=z_mask, other=0.0)

    @triton.jit
    def _slot_pre(g, u, zg, zu, e, bg_ptr, bu_ptr, cols, col_ok, rk, r_ok, rank, scale,
                  n_cols: tl.constexpr, HAS_LORA: tl.constexpr, PREC: tl.constexpr):
        """The slot's gate and up (fp32) with its LoRA deltas added."""
        if HAS_LORA:
            g += scale * tl.dot(zg, _r_tile(bg_ptr, e, cols, col_ok, rk, r_ok, rank, n_cols), input_precision=PREC)
            u += scale * tl.dot(zu, _r_tile(bu_ptr, e, cols, col_ok, rk, r_ok, rank, n_cols), input_precision=PREC)
        return g, u

    @triton.jit
    def _dropped(h, keep_ptr, off, mask, keep_scale, HAS_KEEP: tl.constexpr):
        """h in the factors' dtype, times the dropout mask and its scale when there is one."""
        if HAS_KEEP:
            kp = tl.load(keep_ptr + off, mask=mask, other=0)
            h = tl.where(kp != 0, h * keep_scale, 0.0)
        return h

    @triton.jit
    def _forward_slot(g, u, zg, zu, e, w, zd, keep_ptr, off, mask, bg_ptr, bu_ptr, da_ptr, cols, col_ok, rk, r_ok,
                      rank, scale, keep_scale, n_cols: tl.constexpr, HAS_LORA: tl.constexpr,
                      HAS_KEEP: tl.constexpr, PREC: tl.constexpr):
        """(w h of the slot, its zd accumulator updated with dropout(h) Ad^T)."""
        g, u = _slot_pre(g, u, zg, zu, e, bg_ptr, bu_ptr, cols, col_ok, rk, r_ok, rank, scale, n_cols, HAS_LORA, PREC)
        h = g * tl.sigmoid(g) * u
        if HAS_LORA:
            hd = _dropped(h.to(da_ptr.dtype.element_ty).to(tl.float32), keep_ptr, off, mask, keep_scale, HAS_KEEP)
            da = tl.trans(_r_tile(da_ptr, e, cols, col_ok, rk, r_ok, rank, n_cols))  # [N, R]
            zd += tl.dot(hd.to(da_ptr.dtype.element_ty), da, input_precision=PREC)
        return w[:, None] * h, zd

    @triton.autotune(configs=_FORWARD_CONFIGS, key=["n_cols", "rank", "K", "SPLIT", "HAS_LORA", "HAS_KEEP"],
                     prune_configs_by=_PRUNE)
    @triton.jit
    def _forward_kernel(
        gate_ptr, up_ptr, mixed_ptr, za_ptr, w_ptr, bg_ptr, bu_ptr, da_ptr, zd_ptr, keep_ptr, perm_ptr, sched_ptr,
        n_tiles, n_rows, plane, rank: tl.constexpr, n_experts: tl.constexpr, scale, keep_scale, n_cols: tl.constexpr,
        K: tl.constexpr, SPLIT: tl.constexpr, HAS_LORA: tl.constexpr, HAS_KEEP: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        combo, start, end = scheduled_tile(sched_ptr, n_tiles)
        if start >= end:
            return
        pos = start + tl.arange(0, BLOCK_M)
        row_ok = pos < end
        tok = tl.load(perm_ptr + pos, mask=row_ok, other=0).to(tl.int64)
        e0 = combo % n_experts
        e1 = (combo // n_experts) % n_experts
        w0 = tl.load(w_ptr + tok * K, mask=row_ok, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + tok * K + (K - 1), mask=row_ok, other=0.0).to(tl.float32)
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < rank
        z_mask = row_ok[:, None] & r_ok[None, :]
        width = 2 * n_experts * rank
        zg0 = _z_tile(za_ptr, tok, e0 * rank, width, rk, z_mask)
        zu0 = _z_tile(za_ptr, tok, (n_experts + e0) * rank, width, rk, z_mask)
        zg1 = _z_tile(za_ptr, tok, e1 * rank, width, rk, z_mask)
        zu1 = _z_tile(za_ptr, tok, (n_experts + e1) * rank, width, rk, z_mask)
        zd0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        zd1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        chunk: tl.constexpr = (n_cols + SPLIT * BLOCK_N - 1) // (SPLIT * BLOCK_N) * BLOCK_N
        part = tl.program_id(1)
        for c in range(0, chunk, BLOCK_N):
            cols = part * chunk + c + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            mask = row_ok[:, None] & col_ok[None, :]
            off = tok[:, None] * n_cols + cols[None, :]
            g = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + off, mask=mask, other=0.0).to(tl.float32)
            mix, zd0 = _forward_slot(g, u, zg0, zu0, e0, w0, zd0, keep_ptr, off, mask, bg_ptr, bu_ptr, da_ptr, cols,
                                     col_ok, rk, r_ok, rank, scale, keep_scale, n_cols, HAS_LORA, HAS_KEEP, PREC)
            if K == 2:
                mix1, zd1 = _forward_slot(g, u, zg1, zu1, e1, w1, zd1, keep_ptr + plane, off, mask, bg_ptr, bu_ptr,
                                          da_ptr, cols, col_ok, rk, r_ok, rank, scale, keep_scale, n_cols, HAS_LORA,
                                          HAS_KEEP, PREC)
                mix += mix1
            tl.store(mixed_ptr + off, mix.to(mixed_ptr.dtype.element_ty), mask=mask)
        if HAS_LORA:  # this chunk's partial sums, fp32 [SPLIT, T, K, r]
            z_off = part.to(tl.int64) * n_rows * K * rank + tok[:, None] * (K * rank) + rk[None, :]
            tl.store(zd_ptr + z_off, zd0, mask=z_mask)
            if K == 2:
                tl.store(zd_ptr + z_off + rank, zd1, mask=z_mask)

    @triton.jit
    def _backward_slot(dm, g, u, zg, zu, dzo, e, w, keep_ptr, off, mask, bg_ptr, bu_ptr, da_ptr, cols, col_ok, rk,
                       r_ok, rank, scale, keep_scale, n_cols: tl.constexpr, HAS_LORA: tl.constexpr,
                       HAS_KEEP: tl.constexpr, PREC: tl.constexpr):
        """(d gate, d up of the slot in the factors' dtype as fp32 values, h of the slot): the gradient
        reaching h is w (d mixed + dropout(dzo Ad))."""
        g, u = _slot_pre(g, u, zg, zu, e, bg_ptr, bu_ptr, cols, col_ok, rk, r_ok, rank, scale, n_cols, HAS_LORA, PREC)
        dh = dm
        if HAS_LORA:
            extra = tl.dot(dzo, _r_tile(da_ptr, e, cols, col_ok, rk, r_ok, rank, n_cols), input_precision=PREC)
            dh += _dropped(extra, keep_ptr, off, mask, keep_scale, HAS_KEEP)
        dh = dh * w[:, None]
        sig = tl.sigmoid(g)
        silu = g * sig
        low = da_ptr.dtype.element_ty  # the block's compute dtype
        dg = (dh * u * (sig * (1.0 + g * (1.0 - sig)))).to(low).to(tl.float32)
        du = (dh * silu).to(low).to(tl.float32)
        return dg, du, silu * u

    @triton.jit
    def _token_tiles(dm_ptr, gate_ptr, up_ptr, tok, cols, row_ok, col_ok, n_cols: tl.constexpr):
        """[M, N] tiles of d mixed, gate and up at rows ``tok``, columns ``cols``. With stored slot rows the backward
        kernel reads them a column step ahead itself: Triton's pipeliner prefetches only loads whose values reach a
        ``tl.dot``, and then none of these does (without stored rows the LoRA input-gradient products take them)."""
        mask = row_ok[:, None] & col_ok[None, :]
        off = tok[:, None] * n_cols + cols[None, :]
        return (tl.load(dm_ptr + off, mask=mask, other=0.0), tl.load(gate_ptr + off, mask=mask, other=0.0),
                tl.load(up_ptr + off, mask=mask, other=0.0))

    @triton.jit
    def _store_slot_row(rg_ptr, ru_ptr, rh_ptr, row, dg, du, h, keep_ptr, off, mask, cols, keep_scale,
                        n_cols: tl.constexpr, HAS_KEEP: tl.constexpr):
        """A slot's d gate, d up and dropout(h) at its sorted row, for the grouped LoRA weight-gradient GEMMs."""
        low = rh_ptr.dtype.element_ty
        dst = row[:, None] * n_cols + cols[None, :]
        tl.store(rg_ptr + dst, dg.to(low), mask=mask)
        tl.store(ru_ptr + dst, du.to(low), mask=mask)
        tl.store(rh_ptr + dst, _dropped(h.to(low).to(tl.float32), keep_ptr, off, mask, keep_scale, HAS_KEEP).to(low),
                 mask=mask)

    @triton.autotune(configs=_BACKWARD_CONFIGS,
                     key=["n_cols", "rank", "K", "SPLIT", "HAS_LORA", "HAS_KEEP", "NEED_W", "SLOT_ROWS"],
                     prune_configs_by=_PRUNE)
    @triton.jit
    def _backward_kernel(
        dm_ptr, gate_ptr, up_ptr, sg_ptr, su_ptr, za_ptr, dzo_ptr, w_ptr, bg_ptr, bu_ptr, da_ptr, dz_ptr, gw_ptr,
        keep_ptr, perm_ptr, sched_ptr, row_ptr, rg_ptr, ru_ptr, rh_ptr,
        n_tiles, n_rows, plane, rank: tl.constexpr, n_experts: tl.constexpr, scale, keep_scale, n_cols: tl.constexpr,
        K: tl.constexpr, SPLIT: tl.constexpr, HAS_LORA: tl.constexpr, HAS_KEEP: tl.constexpr, NEED_W: tl.constexpr,
        SLOT_ROWS: tl.constexpr, WIDE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        combo, start, end = scheduled_tile(sched_ptr, n_tiles)
        if start >= end:
            return
        pos = start + tl.arange(0, BLOCK_M)
        row_ok = pos < end
        tok = tl.load(perm_ptr + pos, mask=row_ok, other=0)
        if WIDE:
            tok = tok.to(tl.int64)
        e0 = combo % n_experts
        e1 = (combo // n_experts) % n_experts
        w0 = tl.load(w_ptr + tok * K, mask=row_ok, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + tok * K + (K - 1), mask=row_ok, other=0.0).to(tl.float32)
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < rank
        z_mask = row_ok[:, None] & r_ok[None, :]
        width = 2 * n_experts * rank
        zg0 = _z_tile(za_ptr, tok, e0 * rank, width, rk, z_mask)
        zu0 = _z_tile(za_ptr, tok, (n_experts + e0) * rank, width, rk, z_mask)
        zg1 = _z_tile(za_ptr, tok, e1 * rank, width, rk, z_mask)
        zu1 = _z_tile(za_ptr, tok, (n_experts + e1) * rank, width, rk, z_mask)
        dzo0 = _z_tile(dzo_ptr, tok, e0 * rank, n_experts * rank, rk, z_mask)
        dzo1 = _z_tile(dzo_ptr, tok, e1 * rank, n_experts * rank, rk, z_mask)
        dzg0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dzu0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dzg1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dzu1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        gw0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        gw1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if SLOT_ROWS:  # each slot's row in the expert-sorted [S, I] outputs
            row0 = tl.load(row_ptr + tok * K, mask=row_ok, other=0).to(tok.dtype)
            row1 = tl.load(row_ptr + tok * K + (K - 1), mask=row_ok, other=0).to(tok.dtype)
        chunk: tl.constexpr = (n_cols + SPLIT * BLOCK_N - 1) // (SPLIT * BLOCK_N) * BLOCK_N
        part = tl.program_id(1)
        low = da_ptr.dtype.element_ty
        if SLOT_ROWS:
            first = part * chunk + tl.arange(0, BLOCK_N)
            tiles = _token_tiles(dm_ptr, gate_ptr, up_ptr, tok, first, row_ok, first < n_cols, n_cols)
        for c in range(0, chunk, BLOCK_N):
            cols = part * chunk + c + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            mask = row_ok[:, None] & col_ok[None, :]
            off = tok[:, None] * n_cols + cols[None, :]
            if SLOT_ROWS:  # this step's tiles came a step ahead; read the next step's while this one computes
                dm, g, u = tiles
                ahead = cols + BLOCK_N
                tiles = _token_tiles(dm_ptr, gate_ptr, up_ptr, tok, ahead, row_ok,
                                     (ahead < n_cols) & (c + BLOCK_N < chunk), n_cols)
            else:
                dm, g, u = _token_tiles(dm_ptr, gate_ptr, up_ptr, tok, cols, row_ok, col_ok, n_cols)
            dm, g, u = dm.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            sg, su, h = _backward_slot(dm, g, u, zg0, zu0, dzo0, e0, w0, keep_ptr, off, mask, bg_ptr, bu_ptr, da_ptr,
                                       cols, col_ok, rk, r_ok, rank, scale, keep_scale, n_cols, HAS_LORA, HAS_KEEP,
                                       PREC)
            if HAS_LORA and not SLOT_ROWS:
                dzg0 += tl.dot(sg.to(low), tl.trans(_r_tile(bg_ptr, e0, cols, col_ok, rk, r_ok, rank, n_cols)),
                               input_precision=PREC)
                dzu0 += tl.dot(su.to(low), tl.trans(_r_tile(bu_ptr, e0, cols, col_ok, rk, r_ok, rank, n_cols)),
                               input_precision=PREC)
            if NEED_W:
                gw0 += tl.sum(h * dm, 1)
            if SLOT_ROWS:
                _store_slot_row(rg_ptr, ru_ptr, rh_ptr, row0, sg, su, h, keep_ptr, off, mask, cols, keep_scale,
                                n_cols, HAS_KEEP)
            if K == 2:
                dg, du, h = _backward_slot(dm, g, u, zg1, zu1, dzo1, e1, w1, keep_ptr + plane, off, mask, bg_ptr,
                                           bu_ptr, da_ptr, cols, col_ok, rk, r_ok, rank, scale, keep_scale, n_cols,
                                           HAS_LORA, HAS_KEEP, PREC)
                if HAS_LORA and not SLOT_ROWS:
                    dzg1 += tl.dot(dg.to(low), tl.trans(_r_tile(bg_ptr, e1, cols, col_ok, rk, r_ok, rank, n_cols)),
                                   input_precision=PREC)
                    dzu1 += tl.dot(du.to(low), tl.trans(_r_tile(bu_ptr, e1, cols, col_ok, rk, r_ok, rank, n_cols)),
                                   input_precision=PREC)
                if NEED_W:
                    gw1 += tl.sum(h * dm, 1)
                if SLOT_ROWS:
                    _store_slot_row(rg_ptr, ru_ptr, rh_ptr, row1, dg, du, h, keep_ptr + plane, off, mask, cols,
                                    keep_scale, n_cols, HAS_KEEP)
                sg += dg
                su += du
            tl.store(sg_ptr + off, sg.to(sg_ptr.dtype.element_ty), mask=mask)
            tl.store(su_ptr + off, su.to(su_ptr.dtype.element_ty), mask=mask)
        if HAS_LORA and not SLOT_ROWS:  # this chunk's partial sums, fp32 [SPLIT, T, K, 2, r] (gate, up), scaled
            z_off = part.to(tl.int64) * n_rows * K * 2 * rank + tok[:, None] * (K * 2 * rank) + rk[None, :]
            tl.store(dz_ptr + z_off, dzg0 * scale, mask=z_mask)
            tl.store(dz_ptr + z_off + rank, dzu0 * scale, mask=z_mask)
            if K == 2:
                tl.store(dz_ptr + z_off + 2 * rank, dzg1 * scale, mask=z_mask)
                tl.store(dz_ptr + z_off + 3 * rank, dzu1 * scale, mask=z_mask)
        if NEED_W:  # fp32 [SPLIT, T, K]
            tl.store(gw_ptr + part.to(tl.int64) * n_rows * K + tok * K, gw0, mask=row_ok)
            if K == 2:
                tl.store(gw_ptr + part.to(tl.int64) * n_rows * K + tok * K + 1, gw1, mask=row_ok)

    @triton.jit
    def _grad_rows(s0, end, acc_g, acc_u, acc_a, dm_ptr, gate_ptr, up_ptr, za_ptr, dzo_ptr, w_ptr, keep_ptr, order_ptr,
                   bg, bu, da, e, cols, col_ok, rk, r_ok, plane, rank, n_experts, scale, keep_scale,
                   n_cols: tl.constexpr, K: tl.constexpr, HAS_KEEP: tl.constexpr, WIDE: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr):
        """Add BLOCK_M sorted slot rows of expert e from s0 to the three weight-gradient accumulators."""
        low = da.dtype
        pos = s0 + tl.arange(0, BLOCK_M)
        row_ok = pos < end
        flat = tl.load(order_ptr + pos, mask=row_ok, other=0)  # slot t * K + j
        if WIDE:
            flat = flat.to(tl.int64)
        tok = flat // K
        z_mask = row_ok[:, None] & r_ok[None, :]
        width = 2 * n_experts * rank
        zg = _z_tile(za_ptr, tok, e * rank, width, rk, z_mask)
        zu = _z_tile(za_ptr, tok, (n_experts + e) * rank, width, rk, z_mask)
        dzo = _z_tile(dzo_ptr, tok, e * rank, n_experts * rank, rk, z_mask)
        w = tl.load(w_ptr + flat, mask=row_ok, other=0.0).to(tl.float32)
        mask = row_ok[:, None] & col_ok[None, :]
        off = tok[:, None] * n_cols + cols[None, :]
        keep_off = (flat % K)[:, None] * plane + off
        g = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dm = tl.load(dm_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g += scale * tl.dot(zg, bg, input_precision=PREC)
        u += scale * tl.dot(zu, bu, input_precision=PREC)
        dh = dm + _dropped(tl.dot(dzo, da, input_precision=PREC), keep_ptr, keep_off, mask, keep_scale, HAS_KEEP)
        dh = dh * w[:, None]
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = (dh * u * (sig * (1.0 + g * (1.0 - sig)))).to(low)
        du = (dh * silu).to(low)
        hd = _dropped((silu * u).to(low).to(tl.float32), keep_ptr, keep_off, mask, keep_scale, HAS_KEEP).to(low)
        acc_g += tl.dot(tl.trans(dg), zg, input_precision=PREC)
        acc_u += tl.dot(tl.trans(du), zu, input_precision=PREC)
        acc_a += tl.dot(tl.trans(hd), (dzo.to(tl.float32) * w[:, None]).to(low), input_precision=PREC)
        return acc_g, acc_u, acc_a

    @triton.autotune(configs=_GRAD_CONFIGS, key=["n_cols", "rank", "K", "HAS_KEEP"], prune_configs_by=_PRUNE)
    @triton.jit
    def _weight_grads_kernel(
        dm_ptr, gate_ptr, up_ptr, za_ptr, dzo_ptr, w_ptr, bg_ptr, bu_ptr, da_ptr, dbg_ptr, dbu_ptr, dda_ptr,
        keep_ptr, order_ptr, offs_ptr, counts_ptr,
        n_rows, plane, rank: tl.constexpr, n_experts: tl.constexpr, scale, keep_scale, n_cols: tl.constexpr,
        K: tl.constexpr, HAS_KEEP: tl.constexpr, WIDE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        e = tl.program_id(0).to(tl.int64)
        end = tl.load(offs_ptr + e)
        start = end - tl.load(counts_ptr + e).to(tl.int32)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < rank
        bg = _r_tile(bg_ptr, e, cols, col_ok, rk, r_ok, rank, n_cols)
        bu = _r_tile(bu_ptr, e, cols, col_ok, rk, r_ok, rank, n_cols)
        da = _r_tile(da_ptr, e, cols, col_ok, rk, r_ok, rank, n_cols)
        acc_g = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        acc_a = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)  # transposed, like the others
        if INTERPRET:  # the interpreter's scalars are 1-element arrays, which range() refuses
            s0 = start
            while s0 < end:
                acc_g, acc_u, acc_a = _grad_rows(
                    s0, end, acc_g, acc_u, acc_a, dm_ptr, gate_ptr, up_ptr, za_ptr, dzo_ptr, w_ptr, keep_ptr,
                    order_ptr, bg, bu, da, e, cols, col_ok, rk, r_ok, plane, rank, n_experts, scale, keep_scale,
                    n_cols, K, HAS_KEEP, WIDE, PREC, BLOCK_M)
                s0 += BLOCK_M
        else:
            for s0 in range(start, end, BLOCK_M):
                acc_g, acc_u, acc_a = _grad_rows(
                    s0, end, acc_g, acc_u, acc_a, dm_ptr, gate_ptr, up_ptr, za_ptr, dzo_ptr, w_ptr, keep_ptr,
                    order_ptr, bg, bu, da, e, cols, col_ok, rk, r_ok, plane, rank, n_experts, scale, keep_scale,
                    n_cols, K, HAS_KEEP, WIDE, PREC, BLOCK_M)
        b_off = e * n_cols * rank + cols[:, None] * rank + rk[None, :]  # [N, R] of [E, I, r]
        b_mask = col_ok[:, None] & r_ok[None, :]
        tl.store(dbg_ptr + b_off, (acc_g * scale).to(dbg_ptr.dtype.element_ty), mask=b_mask)
        tl.store(dbu_ptr + b_off, (acc_u * scale).to(dbu_ptr.dtype.element_ty), mask=b_mask)
        a_off = e * rank * n_cols + rk[None, :] * n_cols + cols[:, None]  # [N, R] of [E, r, I]
        tl.store(dda_ptr + a_off, acc_a.to(dda_ptr.dtype.element_ty), mask=b_mask)


def _wide(*sizes: int) -> bool:
    """Whether offsets into buffers of these sizes need 64 bits (the backward and weight-gradient kernels
    keep 32-bit row indices below that, for fewer registers)."""
    return max(sizes) >= 2**31


def _factors(like: torch.Tensor, lora: tuple | None) -> tuple:
    """(Bg, Bu, Ad as ``kernel_factors`` gives them, rank), or dummies without LoRA."""
    if lora is None:
        return like, like, like, 0
    bg, bu, da = lora
    return bg, bu, da, bg.shape[1]


def mix_forward(
    gate: torch.Tensor, up: torch.Tensor, za: torch.Tensor | None, weights: torch.Tensor, lora: tuple | None,
    keep: torch.Tensor | None, keep_scale: float, scale: float, combos: tuple[SlotGrouping, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mixed [T, I], zd [T, k, r] or None). ``lora`` = (Bg, Bu, Ad) as ``kernel_factors`` gives them, [E, r, I]
    each; keep [k, T, I] bool."""
    rows, n_cols = gate.shape
    k = weights.shape[1]
    bg, bu, da, rank = _factors(gate, lora)
    grouping, sched = combos
    n_tiles = sched.shape[1]
    split = _split(n_tiles, n_cols)
    mixed = torch.empty_like(gate)
    zd = gate.new_empty(split, rows, k, rank, dtype=torch.float32) if lora is not None else None
    _forward_kernel[(n_tiles, split)](
        gate, up, mixed, za if za is not None else gate, weights.contiguous(), bg, bu, da,
        zd if zd is not None else gate, keep if keep is not None else gate, grouping.order, sched,
        n_tiles, rows, rows * n_cols, max(rank, 1), bg.shape[0] if lora is not None else 1, scale, keep_scale,
        n_cols=n_cols, K=k, SPLIT=split, HAS_LORA=lora is not None, HAS_KEEP=keep is not None,
        PREC=_precision(gate.dtype), BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank),
    )
    return mixed, None if zd is None else zd.sum(0).to(gate.dtype)


def mix_backward(
    d_mixed: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, za: torch.Tensor | None, dz_mix: torch.Tensor | None,
    weights: torch.Tensor, lora: tuple | None, keep: torch.Tensor | None, keep_scale: float, scale: float,
    combos: tuple[SlotGrouping, torch.Tensor], need_w: bool, slots: SlotGrouping | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple | None]:
    """(sum_j d gate_j, sum_j d up_j [T, I], the gate/up LoRA input gradients [T, k, 2, r] or None,
    sum over I of h_j * d_mixed [T, k] fp32 or None, and with ``slots`` (the [T, k] choices sorted by expert)
    each slot's d gate, d up and dropout(h) [S, I] in that order, else None). dz_mix [T, E*r] is s dy Bd of
    every expert. ``lora`` as for ``mix_forward``."""
    rows, n_cols = gate.shape
    k = weights.shape[1]
    bg, bu, da, rank = _factors(gate, lora)
    grouping, sched = combos
    n_tiles = sched.shape[1]
    split = _split(n_tiles, n_cols)
    sum_gate, sum_up = torch.empty_like(gate), torch.empty_like(gate)
    dz = gate.new_empty(split, rows, k, 2, rank, dtype=torch.float32) if lora is not None and slots is None else None
    gw = gate.new_empty(split, rows, k, dtype=torch.float32) if need_w else None
    slot_rows = tuple(bg.new_empty(rows * k, n_cols) for _ in range(3)) if slots is not None else (gate,) * 3
    _backward_kernel[(n_tiles, split)](
        d_mixed.contiguous(), gate, up, sum_gate, sum_up, za if za is not None else gate,
        dz_mix.contiguous() if dz_mix is not None else gate, weights.contiguous(), bg, bu, da,
        dz if dz is not None else gate, gw if gw is not None else gate, keep if keep is not None else gate,
        grouping.order, sched, slots.inverse if slots is not None else grouping.order, *slot_rows,
        n_tiles, rows, rows * n_cols, max(rank, 1), bg.shape[0] if lora is not None else 1,
        scale, keep_scale, n_cols=n_cols, K=k, SPLIT=split, HAS_LORA=lora is not None, HAS_KEEP=keep is not None,
        NEED_W=need_w, SLOT_ROWS=slots is not None, WIDE=_wide(k * gate.numel(), split * rows * k * 2 * max(rank, 1)),
        PREC=_precision(gate.dtype), BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank),
    )
    if dz is not None:
        dz = dz.sum(0).to(gate.dtype)
    elif lora is not None:  # the stored rows give them
        dz = _row_lora_grads(slot_rows, bg, bu, slots, scale, k)
    return sum_gate, sum_up, dz, None if gw is None else gw.sum(0), slot_rows if slots is not None else None


def _row_lora_grads(slot_rows: tuple, bg: torch.Tensor, bu: torch.Tensor, slots: SlotGrouping, scale: float,
                    k: int) -> torch.Tensor:
    """The gate/up LoRA input gradients [T, k, 2, r], s d gate_j Bg and s d up_j Bu, from the stored slot rows
    (sorted by expert) as two grouped GEMMs, instead of four r-wide products a column step in the backward kernel,
    whose fp32 accumulators would hold registers for the whole pass."""
    d_gate, d_up, _ = slot_rows
    return slot_pairs(segment_mm(d_gate, bg.transpose(1, 2), slots), segment_mm(d_up, bu.transpose(1, 2), slots),
                      slots, k) * scale


def lora_weight_grads(
    d_mixed: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, za: torch.Tensor, dz_mix: torch.Tensor,
    weights: torch.Tensor, lora: tuple, keep: torch.Tensor | None, keep_scale: float, scale: float,
    slots: SlotGrouping,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Bg, Bu [E, I, r] and Ad [E, r, I], each expert's sum over its slots (``slots``: the
    [T, k] choices sorted by expert). ``lora`` as for ``mix_forward``."""
    rows, n_cols = gate.shape
    bg, bu, da, rank = _factors(gate, lora)
    num_experts = bg.shape[0]
    d_bg, d_bu = (bg.new_empty(num_experts, n_cols, rank) for _ in range(2))  # [E, I, r], as the parameters
    d_da = torch.empty_like(da)
    grid = lambda meta: (num_experts, triton.cdiv(n_cols, meta["BLOCK_N"]))  # noqa: E731
    _weight_grads_kernel[grid](
        d_mixed.contiguous(), gate, up, za.contiguous(), dz_mix.contiguous(), weights.contiguous(), bg, bu, da,
        d_bg, d_bu, d_da, keep if keep is not None else gate, slots.order, slots.offs, slots.counts,
        rows, rows * n_cols, rank, num_experts, scale, keep_scale, n_cols=n_cols, K=weights.shape[1],
        HAS_KEEP=keep is not None, WIDE=_wide(weights.shape[1] * gate.numel()), PREC=_precision(gate.dtype),
        INTERPRET=_INTERPRET, BLOCK_R=_block_r(rank),
    )
    return d_bg, d_bu, d_da
