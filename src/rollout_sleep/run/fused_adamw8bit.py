"""torchao's AdamW8bit with bf16 stochastic rounding, each tensor stepped by one Triton kernel.

torchao steps every parameter through a compiled graph called anew from Python for each tensor, which reads and
writes the tensor several times (its moments dequantized to float32 buffers, their block scales, the search of
the code map, the rounding). :class:`FusedAdamW8bit` is the same optimizer (class, state and checkpoint format:
torchao's ``OptimState8bit`` moments, 256-element blocks, the same code maps) whose step
reads each element once (the bf16 weight and gradient, the two uint8 codes and their blocks' scales) and writes
the weight and the codes back; the small tensors whose moments torchao keeps in bf16 take a second kernel. Nothing
beyond the state is allocated (torchao's step holds 8 bytes per element of the largest tensor).

The arithmetic is torchao's, operation for operation, for AdamW's betas over 0.5 (past a weight of 0.5
``torch.lerp`` takes another formula: other betas take torchao's step), with float32 division and square root
rounded as PyTorch rounds them. Where PyTorch fuses a multiply-add (its CPU ``lerp``) a moment may differ by one
float32 rounding, which now and then moves a code or a bf16 moment across a rounding boundary. A NaN gradient
(which the recipe's non-finite guard stops first) makes its block's scales NaN, as torchao's.

The kernels run where Triton does (a CUDA tensor, or Triton's interpreter, ``TRITON_INTERPRET=1``, which the CPU
tests use) on a bf16, contiguous parameter with a bf16 gradient; any other tensor (a DTensor shard, a CPU tensor,
float32 weights) takes torchao's own compiled step. The random bits of the rounding come from Triton's Philox,
keyed by a seed drawn from PyTorch's CPU generator (``torch.manual_seed`` makes a run repeatable), the tensor and its step count, so they
differ from torchao's ``torch.randint`` draws: the rounding is unbiased alike, not equal bit for bit. Philox's
32-bit counter is the element's index: a tensor past 2^32 elements reuses its draws 2^32 apart.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torchao.optim import AdamW8bit
from torchao.optim.adam import single_param_adam
from torchao.optim.subclass_8bit import OptimState8bit

BLOCK = 256  # torchao's AdamW8bit block: one float32 scale per 256 elements of each moment
ROWS = 4  # blocks per program of the 8-bit kernel
PLAIN = 1024  # elements per program of the plain kernel
SEED_STRIDE = 0x9E3779B97F4A7C15 % 2**62  # odd: distinct (place, step < 2^24) pairs never share a key
TRITON = importlib.util.find_spec("triton") is not None
# Triton's interpreter is chosen when its kernels are defined (at import): read here once, as Triton reads it
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_runs(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device here: Triton is installed and ``t`` is a CUDA tensor, or
    Triton's interpreter is on (CPU tensors)."""
    return TRITON and (t.is_cuda if not INTERPRET else t.device.type == "cpu")


if TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quantize(x, qmap):
        # torchao's quantize_8bit_with_qmap: a branchless binary search of the sorted 256-entry map, then the
        # nearer of the two neighbouring codes (ties up)
        codes = tl.where(x >= tl.load(qmap + 128), 128, 0)
        codes += tl.where(x >= tl.load(qmap + codes + 64), 64, 0)
        codes += tl.where(x >= tl.load(qmap + codes + 32), 32, 0)
        codes += tl.where(x >= tl.load(qmap + codes + 16), 16, 0)
        codes += tl.where(x >= tl.load(qmap + codes + 8), 8, 0)
        codes += tl.where(x >= tl.load(qmap + codes + 4), 4, 0)
        codes += tl.where(x >= tl.load(qmap + codes + 2), 2, 0)
        codes += tl.where(x >= tl.load(qmap + codes + 1), 1, 0)
        up = tl.minimum(codes + 1, 255)
        down_value = tl.load(qmap + codes)
        up_value = tl.load(qmap + up)
        return tl.where(x - down_value >= (up_value - down_value) * 0.5, up, codes)

    @triton.jit(do_not_specialize=["seed"])
    def _adamw8bit_step(p_ptr, g_ptr, m_codes, m_scales, m_qmap, v_codes, v_scales, v_qmap, n_blocks,
                        lr_ptr, lr_value, decay, one_minus_beta1, one_minus_beta2, eps, bias1, bias2_sqrt, seed,
                        LR_ON_DEVICE: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
        rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
        live = rows < n_blocks
        offs = rows[:, None].to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
        mask = live[:, None]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_qmap + tl.load(m_codes + offs, mask=mask, other=0).to(tl.int32))
        m = m * tl.load(m_scales + rows, mask=live, other=0.0)[:, None]
        v = tl.load(v_qmap + tl.load(v_codes + offs, mask=mask, other=0).to(tl.int32))
        v = v * tl.load(v_scales + rows, mask=live, other=0.0)[:, None]

        lr = _lr(lr_ptr, lr_value, LR_ON_DEVICE)
        p, m, v = _decay_and_moments(p, g, m, v, lr, decay, one_minus_beta1, one_minus_beta2)

        # torchao's scale_tensor: the absmax per block, at least 1e-12; a NaN kept, as torch's amax and clip keep
        # it (Triton's max and maximum drop it)
        m_scale = tl.maximum(tl.reduce(tl.abs(m), 1, _max_keeping_nan), 1e-12, propagate_nan=tl.PropagateNan.ALL)
        v_scale = tl.maximum(tl.reduce(tl.abs(v), 1, _max_keeping_nan), 1e-12, propagate_nan=tl.PropagateNan.ALL)
        tl.store(m_codes + offs, _quantize(tl.div_rn(m, m_scale[:, None]), m_qmap).to(tl.uint8), mask=mask)
        tl.store(v_codes + offs, _quantize(tl.div_rn(v, v_scale[:, None]), v_qmap).to(tl.uint8), mask=mask)
        tl.store(m_scales + rows, m_scale, mask=live)
        tl.store(v_scales + rows, v_scale, mask=live)
        _update_and_round(p_ptr, p, m, v, lr, eps, bias1, bias2_sqrt, offs, mask, seed)

    @triton.jit
    def _decay_and_moments(p, g, m, v, lr, decay, one_minus_beta1, one_minus_beta2):
        # AdamW's decoupled weight decay and the two moments, by torch.lerp's formula for weights under 0.5
        # (betas over 0.5 only)
        return p - (lr * decay) * p, m + one_minus_beta1 * (g - m), v + one_minus_beta2 * (g * g - v)

    @triton.jit
    def _update_and_round(p_ptr, p, m, v, lr, eps, bias1, bias2_sqrt, offs, mask, seed):
        # the update from the new moments before any quantization, as torchao's step, in IEEE division and square
        # root (Triton's defaults are approximate); then the weight rounded stochastically into bf16 and stored
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        _round_into(p_ptr, p - tl.div_rn(lr * tl.div_rn(m, bias1), denom), offs, mask, seed)

    @triton.jit
    def _lr(lr_ptr, lr_value, LR_ON_DEVICE: tl.constexpr):
        # the group's lr tensor read where it lives: on the device (accelerate moves it there) with no sync
        if LR_ON_DEVICE:
            return tl.load(lr_ptr).to(tl.float32)
        return lr_value

    @triton.jit
    def _max_keeping_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _bf16_nearest(x):
        # float32 to bf16, to nearest even (torchao's copy_), in bits: Triton's interpreter truncates a plain cast
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(x != x, bits, (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536)  # a NaN stays one
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _round_into(p_ptr, p, offs, mask, seed):
        # bf16 stochastic rounding (torchao's _fp32_to_bf16_sr): away from zero with the probability of the 16
        # bits bf16 drops, read as a fraction of 2^16; 32-bit Philox counters (its fast path)
        bits = p.to(tl.int32, bitcast=True)
        rand = tl.randint(seed, offs.to(tl.int32)) & 0xFFFF
        kept = bits & -65536  # 0xFFFF0000
        # (a NaN kept as it is: CUDA's NaN, 0x7FFFFFFF, would round away into 0x80000000, a -0.0)
        bits = tl.where(p != p, bits, tl.where(rand < (bits & 0xFFFF), kept + 65536, kept))
        tl.store(p_ptr + offs, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, n, lr_ptr, lr_value, decay, one_minus_beta1, one_minus_beta2, eps,
                    bias1, bias2_sqrt, seed, LR_ON_DEVICE: tl.constexpr, SIZE: tl.constexpr):
        # the tensors whose moments torchao keeps in the parameter's dtype (under 4096 elements, or not a multiple
        # of the block): rounded to nearest when stored, as torchao's copy_ does
        offs = tl.program_id(0).to(tl.int64) * SIZE + tl.arange(0, SIZE)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lr = _lr(lr_ptr, lr_value, LR_ON_DEVICE)
        p, m, v = _decay_and_moments(p, g, m, v, lr, decay, one_minus_beta1, one_minus_beta2)
        tl.store(m_ptr + offs, _bf16_nearest(m), mask=mask)  # bf16 moments (the parameter's dtype)
        tl.store(v_ptr + offs, _bf16_nearest(v), mask=mask)
        _update_and_round(p_ptr, p, m, v, lr, eps, bias1, bias2_sqrt, offs, mask, seed)


def _shared_seed() -> int:
    """A 62-bit seed from PyTorch's CPU generator; in an initialized process group, rank 0's (each rank's
    generator may be seeded apart: vLLM seeds each rank's engine with its own seed)."""
    seed = torch.randint(0, 2**62, (1,))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        seed = seed.to(device)
        dist.broadcast(seed, src=0)
    return int(seed)


def _quantized(t, p: torch.Tensor) -> bool:
    """A moment the 8-bit kernel steps: torchao's quantized state in 256-element blocks, beside ``p``."""
    return (type(t) is OptimState8bit and t.block_size == BLOCK and t.codes.device == p.device
            and t.codes.is_contiguous() and t.scale.is_contiguous() and t.qmap.is_contiguous())


def _plain(t, p: torch.Tensor) -> bool:
    """A moment the plain kernel steps: a contiguous tensor in ``p``'s dtype beside it (torchao's state of a
    tensor it does not quantize)."""
    return type(t) is torch.Tensor and t.dtype == p.dtype and t.device == p.device and t.is_contiguous()


class FusedAdamW8bit(AdamW8bit):
    """torchao's :class:`~torchao.optim.AdamW8bit` (``bf16_stochastic_round=True``) whose tensors step in one
    Triton kernel each (see the module). Same constructor, state and ``state_dict`` as torchao's.

    The rounding's Philox key is the optimizer's seed (drawn from PyTorch's CPU generator when it is built, rank
    0's in a process group: DDP's replicas round alike and stay equal), the parameter's place in the groups it
    was given and the parameter's step count: the draws do not depend on how the steps are grouped (a step of every
    tensor, or one tensor at a time, ``run.per_tensor``)."""

    def __init__(self, *args, **kwargs):
        self._places: dict[int, int] = {}  # id(parameter) -> its place among the parameters given, in order
        super().__init__(*args, **kwargs)
        self._seed = _shared_seed()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._places.setdefault(id(p), len(self._places))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter with a gradient: a kernel where :meth:`_kernel_of` finds one,
        torchao's compiled per-tensor step elsewhere (torchao's own loop, body for body)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scalars: dict = {}  # the host-side scalars, once per (group, step count) in this call
        with torch._dynamo.utils.disable_cache_limit():
            for g_index, group in enumerate(self.param_groups):
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("Sparse gradient is not supported")
                    state = self.state[p]
                    if len(state) == 0:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                        if group["amsgrad"]:
                            state["max_exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    if not isinstance(group["lr"], torch.Tensor):
                        raise RuntimeError(
                            "lr was changed to a non-Tensor object. If you want to update lr, please use "
                            "optim.param_groups[0]['lr'].fill_(new_lr)")
                    kernel = self._kernel_of(p, state, group)
                    if kernel is None:
                        torch.compile(single_param_adam, fullgraph=True, dynamic=False)(
                            p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"],
                            state.get("max_exp_avg_sq", None), group["lr"], group["betas"][0], group["betas"][1],
                            group["weight_decay"], group["eps"], self.is_adamw,
                            self.bf16_stochastic_round and p.dtype is torch.bfloat16)
                        continue
                    key = (g_index, float(state["step"]))
                    if key not in scalars:
                        scalars[key] = _scalars(group, state["step"])
                    lr = group["lr"]
                    on_device = lr.device == p.device
                    lr_args = (lr, 0.0) if on_device else (p, float(lr.float()))  # (a pointer, a value)
                    place = self._places.setdefault(id(p), len(self._places))  # one swapped in after: a new place
                    # a 62-bit Philox key for each tensor and step
                    seed = (self._seed + (place * 2**24 + int(key[1])) * SEED_STRIDE) % 2**62
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    # Triton launches on the current device: the parameter's, said outright
                    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
                        if kernel == "8bit":
                            n_blocks = p.numel() // BLOCK
                            _adamw8bit_step[(-(-n_blocks // ROWS),)](
                                p, p.grad, m.codes, m.scale, m.qmap, v.codes, v.scale, v.qmap, n_blocks, *lr_args,
                                *scalars[key], seed, LR_ON_DEVICE=on_device, BLOCK_SIZE=BLOCK, ROWS_PER_PROGRAM=ROWS)
                        else:
                            _adamw_step[(-(-p.numel() // PLAIN),)](p, p.grad, m, v, p.numel(), *lr_args,
                                                                   *scalars[key], seed, LR_ON_DEVICE=on_device,
                                                                   SIZE=PLAIN)
        return loss

    def _kernel_of(self, p: torch.Tensor, state: dict, group: dict) -> str | None:
        """``"8bit"`` or ``"plain"``: the kernel that steps ``p`` (a plain bf16 tensor and its gradient, both
        contiguous, rounded stochastically, AdamW's betas over 0.5, no AMSGrad, on a device Triton runs on, both
        moments one kind), or ``None``: torchao's step."""
        if not (self.bf16_stochastic_round and self.is_adamw and not group["amsgrad"]
                and min(group["betas"]) > 0.5  # torch.lerp's other formula above a weight of 0.5: not the kernels
                and type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype is torch.bfloat16
                and p.grad.dtype is torch.bfloat16 and p.is_contiguous() and p.grad.is_contiguous()
                and triton_runs(p)):
            return None
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if _quantized(m, p) and _quantized(v, p) and m.signed and not v.signed:
            return "8bit"
        return "plain" if _plain(m, p) and _plain(v, p) else None


def _scalars(group: dict, step: torch.Tensor) -> tuple[float, ...]:
    """The kernels' scalar arguments but the lr, computed in float32 as torchao's step computes them (``step`` is
    a CPU tensor: no device sync): weight decay, 1 - beta1, 1 - beta2, eps, and the two bias corrections (the
    second's square root)."""
    beta1, beta2 = group["betas"]
    n = step.float().cpu()
    return (float(group["weight_decay"]), float(torch.tensor(1 - beta1)), float(torch.tensor(1 - beta2)),
            float(group["eps"]), float(1 - beta1 ** n), float((1 - beta2 ** n).sqrt()))
