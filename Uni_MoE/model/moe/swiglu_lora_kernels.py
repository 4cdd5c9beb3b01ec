"""Triton kernels for the distinct-expert block: SwiGLU with the r-wide LoRA products fused in.

Rows are token-slots sorted by expert. Each program owns up to BLOCK_M consecutive rows of ONE expert
(``tile_schedule``: tiles never straddle experts) and one of ``split`` column chunks of the intermediate
dimension I, which it walks in BLOCK_N columns, so every r-wide LoRA term is a small ``tl.dot`` on
registers (reductions over I are summed over the chunks in fp32 afterwards, in a fixed order):

- forward: h = silu(gate + s zg Bg^T) * (up + s zu Bu^T), and zd = dropout(h) Ad^T accumulated over I;
- backward: dh += (dzd Ad) * keep, the SwiGLU gradients, and dzg = s d_gate Bg, dzu = s d_up Bu
  accumulated over I; for r <= WGRAD_MAX_RANK also the LoRA weight gradients of the tile's rows,
  d_gate^T zg, d_up^T zu and dzd^T dropout(h), as fp32 partial sums per row tile that ``_tile_sum_kernel``
  adds up per expert in a fixed order (no atomics): no grouped GEMMs re-reading d_gate, d_up and h, and h
  is not stored. Above that rank the partials would outweigh the passes they save.

Neither an [S, I] LoRA delta nor a separate pass over [S, I] for the r-wide products touches memory.
The kernels need CUDA (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``); ``available`` says when.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path in swiglu_lora.py runs instead
    triton = None

BLOCK_M = 64
# From this rank the distinct kernels take row tiles twice as tall: each tile reads its expert's r-wide LoRA
# factor tiles (r x the tile's columns each, as many bytes as 64 rows of gate at r = 64) from L2 half as often per
# row; below it the taller tiles' registers cost more than they save (setting_ab_h200.md).
WIDE_MIN_RANK = 64
# ... as long as a row of the tile's r-wide blocks stays within this many bytes: beyond it (float32 at r = 128) no
# config of the 128-row backward fits in shared memory (an H200's 227 KB); bfloat16 takes them up to r = 128.
WIDE_MAX_ROW_BYTES = 256
WGRAD_MAX_RANK = 16  # fused LoRA weight gradients up to this rank: partials of 12 r bytes per row-tile column
CAPPED_REGS = 128  # four programs of four warps a SM
CAPPED_MAX_RZ = 128 * 64  # the largest [BLOCK_M, BLOCK_R] tile compiled with capped registers
TARGET_PROGRAMS = 2048  # enough programs per SM to keep HBM busy; the column split makes up the rest
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device (set UNI_MOE_TRITON=0 to use the torch path)."""
    if triton is None or os.environ.get("UNI_MOE_TRITON", "1") == "0":
        return False
    return t.is_cuda or (_INTERPRET and t.device.type == "cpu" and t.dtype == torch.float32)  # numpy: no bf16


def tile_schedule(counts: torch.Tensor, offs: torch.Tensor, num_rows: int, block_m: int = BLOCK_M) -> torch.Tensor:
    """[3, n] int32 (expert, first row, end row) of each row tile; n = ceil(rows / block_m) + E bounds the
    tile count without a host sync, and spare tiles get first row = end row (nothing to do)."""
    num_experts = counts.numel()
    n = -(-num_rows // block_m) + num_experts
    tiles = (counts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    t = torch.arange(n, device=counts.device)
    e = torch.searchsorted(cum, t, right=True).clamp_(max=num_experts - 1)
    ends = offs.long()
    first = ends[e] - counts[e] + (t - (cum[e] - tiles[e])) * block_m
    valid = t < cum[-1]
    first = torch.where(valid, first, 0)
    end = torch.where(valid, ends[e], 0)
    return torch.stack([e, first, end]).to(torch.int32).contiguous()


def expert_tile_ranges(counts: torch.Tensor, block_m: int = BLOCK_M) -> torch.Tensor:
    """[2, E] int32 (first tile, end tile) of each expert in ``tile_schedule``'s order."""
    tiles = (counts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    return torch.stack([cum - tiles, cum]).to(torch.int32).contiguous()


def block_m(rank: int, dtype: torch.dtype) -> int:
    """Rows of a distinct kernel's tile at this LoRA rank (0: no LoRA) for gate/up of this dtype."""
    wide = rank >= WIDE_MIN_RANK and dtype.itemsize * _block_r(rank) <= WIDE_MAX_ROW_BYTES
    return 2 * BLOCK_M if wide else BLOCK_M


def fuses_weight_grads(rank: int) -> bool:
    """Whether the backward kernel computes the LoRA weight gradients (as per-tile partials) at this rank."""
    return 0 < rank <= WGRAD_MAX_RANK


def _split(n_tiles: int, n_cols: int) -> int:
    """How many column chunks each row tile is cut into (a power of two, at least 64 columns each)."""
    split = 1
    while split * n_tiles < TARGET_PROGRAMS and 2 * split * 64 <= n_cols:
        split *= 2
    return split


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:
    def configs(choices: tuple[tuple[int, ...], ...], single: tuple[int, ...] = (64, 4, 1),
                capped: tuple[tuple[int, ...], ...] = ()) -> list:
        """Autotuning configs from (BLOCK_N, warps, stages[, BLOCK_M]), and from ``capped`` ones compiled with
        at most CAPPED_REGS registers a thread (several programs per SM, so that one's memory latency hides
        behind another's work, for a few spilled bytes); only ``single`` (a single-stage config, which fits
        every dtype) under the interpreter or with UNI_MOE_AUTOTUNE=0 (correctness checks: no tuning time).
        The choices favour configs that spilled least in an offline SM90 compile."""
        if _INTERPRET or os.environ.get("UNI_MOE_AUTOTUNE", "1") == "0":
            choices, capped = (single,), ()
        return [triton.Config(dict(zip(("BLOCK_N", "BLOCK_M"), (c[0], *c[3:]))), num_warps=c[1], num_stages=c[2],
                              maxnreg=regs)
                for group, regs in ((choices, None), (capped, CAPPED_REGS)) for c in group]

    @triton.jit
    def scheduled_tile(sched_ptr, n_tiles):
        """(group, first row, end row) of this program's row tile in a ``tile_schedule``-made schedule."""
        pid = tl.program_id(0)
        group = tl.load(sched_ptr + pid).to(tl.int64)
        return group, tl.load(sched_ptr + n_tiles + pid), tl.load(sched_ptr + 2 * n_tiles + pid)

    _CONFIGS = configs(((32, 8, 3), (64, 8, 3), (64, 4, 3), (64, 4, 1), (32, 4, 1)),
                       capped=((16, 4, 1), (32, 4, 1), (16, 4, 2)))

    def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
        """float32 (checks only) tries the single-stage configs, whose tiles fit in shared memory; tiles whose
        r-wide blocks exceed CAPPED_MAX_RZ elements skip the register-capped configs (at 128 rows and r = 128 the
        distinct backward's 32-column capped config ran into an invalid program counter under memcheck,
        kernel_memcheck_h200.md). A pinned config the rules would drop stays, so that checks still run it."""
        fp32 = named_args["gate_ptr"].dtype == torch.float32
        big = kwargs.get("BLOCK_M", BLOCK_M) * kwargs.get("BLOCK_R", 0) > CAPPED_MAX_RZ
        kept = [c for c in configs if (c.num_stages == 1 or not fp32) and not (big and c.maxnreg)]
        return kept or configs

    _PRUNE = {"early_config_prune": _prune}

    @triton.autotune(configs=_CONFIGS, key=["n_cols", "rank", "SPLIT", "HAS_LORA", "HAS_KEEP", "BLOCK_M"],
                     prune_configs_by=_PRUNE)
    @triton.jit
    def _forward_kernel(
        gate_ptr, up_ptr, h_ptr, zg_ptr, zu_ptr, bg_ptr, bu_ptr, da_ptr, zd_ptr, keep_ptr, sched_ptr,
        n_tiles, n_rows, rank: tl.constexpr, scale, keep_scale, n_cols: tl.constexpr, SPLIT: tl.constexpr,
        HAS_LORA: tl.constexpr, HAS_KEEP: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        e, start, end = scheduled_tile(sched_ptr, n_tiles)
        if start >= end:
            return
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < rank
        z_mask = row_ok[:, None] & r_ok[None, :]
        z_off = rows64[:, None] * rank + rk[None, :]
        zd = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if HAS_LORA:
            zg = tl.load(zg_ptr + z_off, mask=z_mask, other=0.0)
            zu = tl.load(zu_ptr + z_off, mask=z_mask, other=0.0)
        chunk: tl.constexpr = (n_cols + SPLIT * BLOCK_N - 1) // (SPLIT * BLOCK_N) * BLOCK_N
        part = tl.program_id(1)
        for c in range(0, chunk, BLOCK_N):
            cols = part * chunk + c + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            mask = row_ok[:, None] & col_ok[None, :]
            off = rows64[:, None] * n_cols + cols[None, :]
            g = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if HAS_LORA:
                b_mask = r_ok[:, None] & col_ok[None, :]
                b_off = e * rank * n_cols + rk[:, None] * n_cols + cols[None, :]  # [R, N] tile of B[e] as [r, I]
                bg = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0)
                bu = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0)
                g += scale * tl.dot(zg, bg, input_precision=PREC)
                u += scale * tl.dot(zu, bu, input_precision=PREC)
            h = g * tl.sigmoid(g) * u
            h_low = h.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + off, h_low, mask=mask)
            if HAS_LORA:
                hd = h_low
                if HAS_KEEP:
                    kp = tl.load(keep_ptr + off, mask=mask, other=0)
                    hd = tl.where(kp != 0, h * keep_scale, 0.0).to(h_ptr.dtype.element_ty)
                a_off = e * rank * n_cols + rk[None, :] * n_cols + cols[:, None]  # A[e]^T tile [N, R]
                da = tl.load(da_ptr + a_off, mask=col_ok[:, None] & r_ok[None, :], other=0.0)
                zd += tl.dot(hd, da, input_precision=PREC)
        if HAS_LORA:  # this chunk's partial sum, fp32 [SPLIT, S, r]
            tl.store(zd_ptr + part * n_rows * rank + z_off, zd, mask=z_mask)

    @triton.jit
    def _backward_body(
        dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, h_ptr, zg_ptr, zu_ptr, bg_ptr, bu_ptr, dzd_ptr, da_ptr,
        dzg_ptr, dzu_ptr, keep_ptr, sched_ptr, part_ptr,
        n_tiles, n_rows, rank: tl.constexpr, scale, keep_scale, n_cols: tl.constexpr, SPLIT: tl.constexpr,
        HAS_LORA: tl.constexpr, HAS_KEEP: tl.constexpr, STORE_H: tl.constexpr, WGRAD: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        e, start, end = scheduled_tile(sched_ptr, n_tiles)
        if start >= end:
            return
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < rank
        z_mask = row_ok[:, None] & r_ok[None, :]
        z_off = rows64[:, None] * rank + rk[None, :]
        dzg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dzu = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if HAS_LORA:
            zg = tl.load(zg_ptr + z_off, mask=z_mask, other=0.0)
            zu = tl.load(zu_ptr + z_off, mask=z_mask, other=0.0)
            dzd = tl.load(dzd_ptr + z_off, mask=z_mask, other=0.0)
        chunk: tl.constexpr = (n_cols + SPLIT * BLOCK_N - 1) // (SPLIT * BLOCK_N) * BLOCK_N
        part = tl.program_id(1)
        for c in range(0, chunk, BLOCK_N):
            cols = part * chunk + c + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            mask = row_ok[:, None] & col_ok[None, :]
            off = rows64[:, None] * n_cols + cols[None, :]
            g = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if HAS_KEEP:
                kp = tl.load(keep_ptr + off, mask=mask, other=0)
            if HAS_LORA:
                b_mask = r_ok[:, None] & col_ok[None, :]
                b_off = e * rank * n_cols + rk[:, None] * n_cols + cols[None, :]  # [R, N] tile of B[e] as [r, I]
                bg = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0)
                bu = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0)
                g += scale * tl.dot(zg, bg, input_precision=PREC)
                u += scale * tl.dot(zu, bu, input_precision=PREC)
                da = tl.load(da_ptr + b_off, mask=b_mask, other=0.0)  # A[e] tile [R, N], same layout
                extra = tl.dot(dzd, da, input_precision=PREC)
                if HAS_KEEP:
                    extra = tl.where(kp != 0, extra * keep_scale, 0.0)
                dh += extra
            sig = tl.sigmoid(g)
            silu = g * sig
            dg = (dh * u * (sig * (1.0 + g * (1.0 - sig)))).to(dgate_ptr.dtype.element_ty)
            du = (dh * silu).to(dup_ptr.dtype.element_ty)
            tl.store(dgate_ptr + off, dg, mask=mask)
            tl.store(dup_ptr + off, du, mask=mask)
            if STORE_H or WGRAD:
                h = silu * u
                if HAS_KEEP:
                    h = tl.where(kp != 0, h.to(dgate_ptr.dtype.element_ty).to(tl.float32) * keep_scale, 0.0)
                h = h.to(dgate_ptr.dtype.element_ty)
                if STORE_H:
                    tl.store(h_ptr + off, h, mask=mask)
            if HAS_LORA:
                dzg += tl.dot(dg, tl.trans(bg), input_precision=PREC)
                dzu += tl.dot(du, tl.trans(bu), input_precision=PREC)
            if WGRAD:  # this tile's d Bg, d Bu [N, R] and d Ad [R, N], fp32 [3, n_tiles, I * r]
                plane = n_tiles * n_cols * rank
                p_mask = col_ok[:, None] & r_ok[None, :]
                p_off = pid.to(tl.int64) * n_cols * rank + cols[:, None] * rank + rk[None, :]
                tl.store(part_ptr + p_off, tl.dot(tl.trans(dg), zg, input_precision=PREC), mask=p_mask)
                tl.store(part_ptr + plane + p_off, tl.dot(tl.trans(du), zu, input_precision=PREC), mask=p_mask)
                a_off = pid.to(tl.int64) * n_cols * rank + rk[:, None] * n_cols + cols[None, :]
                tl.store(part_ptr + 2 * plane + a_off, tl.dot(tl.trans(dzd), h, input_precision=PREC),
                         mask=r_ok[:, None] & col_ok[None, :])
        if HAS_LORA:  # this chunk's partial sums, fp32 [SPLIT, S, r]
            tl.store(dzg_ptr + part * n_rows * rank + z_off, dzg * scale, mask=z_mask)
            tl.store(dzu_ptr + part * n_rows * rank + z_off, dzu * scale, mask=z_mask)


    _BACKWARD_KEY = ["n_cols", "rank", "SPLIT", "HAS_LORA", "HAS_KEEP", "STORE_H", "WGRAD", "BLOCK_M"]
    _backward_kernel = triton.autotune(configs=_CONFIGS, key=_BACKWARD_KEY, prune_configs_by=_PRUNE)(_backward_body)
    # writing d_gate, d_up over gate, up: autotuning restores them after each trial run
    _backward_kernel_in_place = triton.autotune(configs=_CONFIGS, key=_BACKWARD_KEY, prune_configs_by=_PRUNE,
                                                restore_value=["gate_ptr", "up_ptr"])(_backward_body)

    @triton.jit
    def _tile_sum_kernel(part_ptr, out_ptr, ranges_ptr, n_tiles, n_experts, width, INTERPRET: tl.constexpr,
                         BLOCK: tl.constexpr):
        """out[f, e] = sum over expert e's row tiles of part[f, tile], f over the three LoRA factors, in order."""
        e = tl.program_id(0)
        f = tl.program_id(2).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        first = tl.load(ranges_ptr + e)
        end = tl.load(ranges_ptr + n_experts + e)
        base = part_ptr + f * n_tiles * width + cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        if INTERPRET:  # the interpreter's scalars are 1-element arrays, which range() refuses
            t = first
            while t < end:
                acc += tl.load(base + t.to(tl.int64) * width, mask=ok, other=0.0)
                t += 1
        else:
            for t in range(first, end):
                acc += tl.load(base + t.to(tl.int64) * width, mask=ok, other=0.0)
        tl.store(out_ptr + (f * n_experts + e) * width + cols, acc, mask=ok)


def _lora_args(gate: torch.Tensor, lora: tuple | None) -> tuple:
    """(zg, zu, Bg, Bu, Ad, rank) made contiguous, or dummies without LoRA."""
    if lora is None:
        return (gate,) * 5 + (0,)
    zg, zu, bg, bu, da = lora
    return zg.contiguous(), zu.contiguous(), bg, bu, da, zg.shape[1]


def swiglu_lora_forward(
    gate: torch.Tensor, up: torch.Tensor, lora: tuple | None, keep: torch.Tensor | None, keep_scale: float,
    scale: float, sched: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h [S, I] and zd [S, r] (None without LoRA). ``lora`` = (zg, zu [S, r], Bg, Bu, Ad as
    ``factor_layout.kernel_factors`` gives them, [E, r, I] each); ``sched``: ``tile_schedule`` at ``block_m`` of
    the rank."""
    rows, n_cols = gate.shape
    h = torch.empty_like(gate)
    zg, zu, bg, bu, da, rank = _lora_args(gate, lora)
    n_tiles = sched.shape[1]
    split = _split(n_tiles, n_cols)
    zd = gate.new_empty(split, rows, rank, dtype=torch.float32) if lora is not None else None
    _forward_kernel[(n_tiles, split)](
        gate, up, h, zg, zu, bg, bu, da, zd if zd is not None else gate, keep if keep is not None else gate,
        sched, n_tiles, rows, max(rank, 1), scale, keep_scale, n_cols=n_cols, SPLIT=split,
        HAS_LORA=lora is not None, HAS_KEEP=keep is not None, PREC=_precision(gate.dtype),
        BLOCK_M=block_m(rank, gate.dtype), BLOCK_R=_block_r(rank),
    )
    return h, None if zd is None else zd.sum(0).to(gate.dtype)


def _tile_sums(part: torch.Tensor, ranges: torch.Tensor, n_cols: int, scale: float, dtype: torch.dtype) -> tuple:
    """Per-tile partials [3, n_tiles, I * r] (d Bg, d Bu as [I, r], d Ad as [r, I]) -> (s d Bg, s d Bu [E, I, r],
    d Ad [E, r, I]) in ``dtype``: expert e sums its tiles ranges[0, e] to ranges[1, e]."""
    _, n_tiles, width = part.shape
    num_experts = ranges.shape[1]
    out = part.new_empty(3, num_experts, width)
    block = 1024
    _tile_sum_kernel[(num_experts, triton.cdiv(width, block), 3)](
        part, out, ranges, n_tiles, num_experts, width, INTERPRET=_INTERPRET, BLOCK=block)
    out[:2] *= scale
    grads = out.to(dtype)
    rank = width // n_cols
    return (grads[0].view(num_experts, n_cols, rank), grads[1].view(num_experts, n_cols, rank),
            grads[2].view(num_experts, rank, n_cols))


def swiglu_lora_backward(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, lora: tuple | None, dzd: torch.Tensor | None,
    keep: torch.Tensor | None, keep_scale: float, scale: float, sched: torch.Tensor, store_h: bool,
    ranges: torch.Tensor | None = None, in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, tuple | None]:
    """(d_gate, d_up [S, I], dropout(h) or None, dzg, dzu [S, r] or None, the LoRA weight gradients or None):
    gradients through the fused forward, given dh [S, I] from the down base and dzd [S, r] (already scaled)
    from the down LoRA; ``sched`` as for the forward. With ``ranges`` (``expert_tile_ranges`` at the same
    ``block_m``; LoRA of rank <= WGRAD_MAX_RANK) the kernel also gives (s d Bg, s d Bu [E, I, r], d Ad [E, r, I]).
    ``in_place``: d_gate and d_up are written over gate and up (each program reads its tile before writing it),
    which must be contiguous."""
    rows, n_cols = gate.shape
    if in_place and not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("in-place SwiGLU backward needs contiguous gate and up")
    d_gate, d_up = (gate, up) if in_place else (torch.empty_like(gate), torch.empty_like(gate))
    h = torch.empty_like(gate) if store_h else None
    zg, zu, bg, bu, da, rank = _lora_args(gate, lora)
    n_tiles = sched.shape[1]
    split = _split(n_tiles, n_cols)
    dzs = gate.new_empty(2, split, rows, rank, dtype=torch.float32) if lora is not None else None
    wgrad = ranges is not None and lora is not None
    part = gate.new_empty(3, n_tiles, n_cols * rank, dtype=torch.float32) if wgrad else None
    kernel = _backward_kernel_in_place if in_place else _backward_kernel
    kernel[(n_tiles, split)](
        dh.contiguous(), gate, up, d_gate, d_up, h if h is not None else gate, zg, zu, bg, bu,
        dzd.contiguous() if dzd is not None else gate, da, dzs[0] if dzs is not None else gate,
        dzs[1] if dzs is not None else gate, keep if keep is not None else gate, sched,
        part if part is not None else gate,
        n_tiles, rows, max(rank, 1), scale, keep_scale, n_cols=n_cols, SPLIT=split,
        HAS_LORA=lora is not None, HAS_KEEP=keep is not None, STORE_H=store_h, WGRAD=wgrad,
        PREC=_precision(gate.dtype), BLOCK_M=block_m(rank, gate.dtype), BLOCK_R=_block_r(rank),
    )
    if dzs is None:
        return d_gate, d_up, h, None, None, None
    dz = dzs.sum(1).to(gate.dtype)
    wgrads = _tile_sums(part, ranges, n_cols, scale, gate.dtype) if wgrad else None
    return d_gate, d_up, h, dz[0], dz[1], wgrads
