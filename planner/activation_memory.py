"""Saved-activation bytes of one training micro-batch, measured on the CPU as a GPU would hold them.

What a step holds between its forward and its backward is what autograd saves. `measure_profile` counts it:
the configured model, at its real width, runs the loop's forward and loss (flow/rectified_flow.py:loss) at two
small token counts and two batches under `torch.autograd.graph.saved_tensors_hooks`, and every saved tensor's
storage is counted once (q, k, v as views of one qkv output, the six chunks of a modulation vector and the bf16
copy of a weight used twice each share one storage). Parameters are not counted: they have their own row.

Two things make the CPU count what a GPU holds (`GpuKernels`):

* attention. On CUDA, SDPA runs FlashAttention-2 (unmasked self-attention) or cuDNN / memory-efficient attention
  (masked cross- and joint attention), which save q, k, v, the output and one fp32 log-sum-exp per query row,
  never the n x n probabilities. What a CPU saves depends on the kernel torch picks there (its math path keeps
  the probabilities; recent builds have a CPU flash kernel), so `FlashAttention`, a stand-in that saves exactly
  what FlashAttention-2 does (plus a masked call's additive bias, which the memory-efficient kernel also keeps),
  runs instead;
* autocast. CPU and CUDA bf16 autocast share the lower-precision list the models use (linear, conv2d, matmul,
  SDPA) and the cast cache (one bf16 copy per fp32 weight, saved for the backward), but CUDA's runs layer_norm
  and group_norm in fp32 (autocast_mode.cpp, AT_FORALL_FP32) and CPU's does not: the fp32 copy a CUDA LayerNorm
  saves and its fp32 output are twice the bf16 ones. `GpuKernels` applies CUDA's policy to those two. Everything
  else the models call on the gradient path (RMSNorm's internal fp32 upcast, the loss's explicit .float(),
  mse_loss in fp32) behaves the same on both. Known remaining differences: the memory-efficient kernel pads its
  log-sum-exp to a multiple of 32 rows and Flash keeps two int64 RNG words (both under a kilobyte per call).

Saved bytes are then exactly affine in the token count n and bilinear with the batch b,
`fixed(n) + b * per_sample(n)` (the fixed part is the weights' bf16 copies and RoPE tables), so two token counts
and two batches determine every coefficient and any other (b, n) follows; tests/test_plan.py checks a third.

Blocks: the model is measured at depth 1 and 2; the difference is one block, with what blocks share (the text
states, the modulation vector, RoPE) counted once, outside. `total(D) = M(1) + (D - 1) (M(2) - M(1))` holds at
any depth, also for JointDiT whose last block differs. With activation checkpointing (trainer/fast_path.py,
non-reentrant torch.utils.checkpoint) a block keeps only its inputs and the backward recomputes one block at a
time, so the peak is what is saved outside the blocks, every block's inputs and one block's full activations.
"""

import functools
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from models import ModelConfig, build_model

MEASURE_GRIDS = (2, 4)
"""Token-grid sides measured (4 and 16 tokens): small enough for a CPU, two points for the affine fit."""
MEASURE_BATCHES = (1, 2)

# CUDA autocast runs these in fp32 (autocast_mode.cpp, AT_FORALL_FP32); CPU autocast leaves them in bf16.
_CUDA_FP32_FUNCTIONS = (F.layer_norm, F.group_norm)


# ---------------------------------------------------------------------------------- the attention stand-in


class FlashAttention(torch.autograd.Function):
    """Attention that saves what FlashAttention-2 saves for its backward: q, k, v, the output and the per-row
    log-sum-exp in fp32 (plus the additive bias of a masked call). The backward recomputes the probabilities
    from them, as FlashAttention-2's does, so the n x n matrix never outlives a call."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            scores = _scores(q, k, bias, scale)
            lse = torch.logsumexp(scores, dim=-1)  # b h n, fp32 (fp64 for fp64 inputs)
            out = (torch.exp(scores - lse[..., None]) @ _acc(v)).to(q.dtype)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, bias = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            p = torch.exp(_scores(q, k, bias, ctx.scale) - lse[..., None])
            do = _acc(grad_out)
            dv = p.transpose(-2, -1) @ do
            dp = do @ _acc(v).transpose(-2, -1)
            ds = p * (dp - (do * _acc(out)).sum(-1, keepdim=True))  # softmax backward, rows of p sum to 1
            dq = ds @ _acc(k) * ctx.scale
            dk = ds.transpose(-2, -1) @ _acc(q) * ctx.scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _acc(t: Tensor) -> Tensor:
    """In the accumulation dtype: fp32 for half-precision inputs, as FlashAttention-2 accumulates."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    scores = (_acc(q) @ _acc(k).transpose(-2, -1)) * scale
    return scores if bias is None else scores + _acc(bias)


def flash_attention(
    q: Float[Tensor, "b h n e"],
    k: Float[Tensor, "b h m e"],
    v: Float[Tensor, "b h m e"],
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Float[Tensor, "b h n e"]:
    """F.scaled_dot_product_attention's signature and result, with `FlashAttention`'s saved tensors. Under
    autocast q, k and v are cast first, as SDPA is on autocast's lower-precision list."""
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("the FlashAttention stand-in takes no dropout, causal mask or GQA (unused here)")
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    bias = None
    if attn_mask is not None:
        bias = attn_mask.to(q.dtype)
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
    return FlashAttention.apply(q, k, v, bias, q.shape[-1] ** -0.5 if scale is None else scale)


class GpuKernels(TorchFunctionMode):
    """While active: SDPA runs `flash_attention`, and under CPU autocast layer_norm and group_norm run in fp32
    as CUDA autocast runs them (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return flash_attention(*args, **kwargs)
        if func in _CUDA_FP32_FUNCTIONS and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map(_to_fp32, (args, kwargs))
        return func(*args, **kwargs)


def _to_fp32(value):
    return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value


# ---------------------------------------------------------------------------------- counting saved storages


class SavedBytes:
    """Counts the storages autograd saves inside `with self:`, each once, leaving out `exclude`'s (the
    parameters). `inside(blocks)` also tells which were saved outside every block and records each block's
    inputs, which is what checkpointed blocks keep."""

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.saved: dict[int, int] = {}  # storage address -> bytes
        self.outside: dict[int, int] = {}
        self.inputs: dict[int, int] = {}
        self._in_block = 0
        self._alive: list[Tensor] = []  # keeps counted storages alive, so no address is reused while counting
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._handles: list = []

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def watch_blocks(self, blocks: Iterable[nn.Module]) -> None:
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._enter_block, with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._leave_block, always_call=True))

    def add(self, tensors: Iterable[Tensor], outside: bool = True) -> None:
        """Count tensors that stay alive through the backward without being saved (the loop's inputs)."""
        for t in tensors:
            self._record(t, self.saved)
            if outside:
                self._record(t, self.outside)

    @property
    def total(self) -> int:
        """Bytes saved by the forward: what a step without checkpointing holds for its backward."""
        return sum(self.saved.values())

    @property
    def checkpointed(self) -> int:
        """Bytes saved outside the blocks plus the blocks' inputs (a storage in both counted once)."""
        return sum((self.outside | self.inputs).values())

    def _pack(self, t: Tensor) -> Tensor:
        self._record(t, self.saved)
        if not self._in_block:
            self._record(t, self.outside)
        return t

    def _record(self, t: Tensor, into: dict[int, int]) -> None:
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.exclude:
            into[storage.data_ptr()] = storage.nbytes()
            self._alive.append(t)

    def _enter_block(self, module, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                self._record(value, self.inputs)
        self._in_block += 1

    def _leave_block(self, module, args, output) -> None:
        self._in_block -= 1


# ---------------------------------------------------------------------------------- affine fits


@dataclass(frozen=True)
class Affine:
    """bytes(b, n) = c0 + c1 n + b (c2 + c3 n): batch-independent plus per-sample bytes, each affine in the
    token count n."""

    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0
    c3: float = 0.0

    def __call__(self, batch: int, tokens: int) -> float:
        return self.fixed(tokens) + batch * self.per_sample(tokens)

    def fixed(self, tokens: int) -> float:
        return self.c0 + self.c1 * tokens

    def per_sample(self, tokens: int) -> float:
        return self.c2 + self.c3 * tokens

    def __add__(self, other: "Affine") -> "Affine":
        return Affine(self.c0 + other.c0, self.c1 + other.c1, self.c2 + other.c2, self.c3 + other.c3)

    def __sub__(self, other: "Affine") -> "Affine":
        return self + other * -1

    def __mul__(self, k: float) -> "Affine":
        return Affine(self.c0 * k, self.c1 * k, self.c2 * k, self.c3 * k)

    @classmethod
    def fit(cls, points: dict[tuple[int, int], float]) -> "Affine":
        """The coefficients through four measurements at batches (b1, b2) x token counts (n1, n2)."""
        (b1, b2), (n1, n2) = sorted({b for b, _ in points}), sorted({n for _, n in points})

        def split(n: int) -> tuple[float, float]:  # (fixed, per sample) at n tokens
            per = (points[b2, n] - points[b1, n]) / (b2 - b1)
            return points[b1, n] - b1 * per, per

        (f1, p1), (f2, p2) = split(n1), split(n2)
        c1, c3 = (f2 - f1) / (n2 - n1), (p2 - p1) / (n2 - n1)
        return cls(f1 - c1 * n1, c1, p1 - c3 * n1, c3)


@dataclass(frozen=True)
class ActivationProfile:
    """Saved-activation bytes of one micro-batch of a model as `Affine`s in (micro-batch, tokens)."""

    full: Affine
    """Everything the forward saves (no checkpointing), the loss and the loop's inputs included."""
    kept: Affine
    """With every block checkpointed: what is saved outside the blocks plus every block's inputs."""
    block: Affine
    """One (non-last) block's full activations: what the backward recomputes and holds at a time."""
    outside: Affine
    """Saved outside the blocks, once: patch embedding, adaLN-single, final layer, unpatchify, the loss."""
    depth: int
    checkpointable: bool
    """Whether trainer/fast_path.py can checkpoint this family (it checkpoints `model.blocks`)."""
    pixel_block: Affine = Affine()
    """Pixel families: one pixel-stream block's full activations (`block` is then a semantic block)."""
    pixel_depth: int = 0

    def bytes(self, micro: int, tokens: int, checkpointing: bool) -> int:
        if not checkpointing:
            return math.ceil(self.full(micro, tokens))
        if not self.checkpointable:
            raise ValueError("train.activation_checkpointing=true: trainer/fast_path.py checkpoints `model.blocks`, "
                             "which the pixel families do not have; set it to false")
        # Until the forward ends, autocast's cache keeps every block's bf16 weight copies (the block's fixed
        # bytes); in the backward each block's are cast again while it is recomputed.
        forward_end = self.kept(micro, tokens) + self.depth * self.block.fixed(tokens)
        backward = self.kept(micro, tokens) + self.block(micro, tokens)
        return math.ceil(max(forward_end, backward))

    def checkpointed_per_sample(self, tokens: int) -> float:
        """Per-sample bytes at the checkpointed peak (the backward's: kept plus one block recomputed)."""
        return self.kept.per_sample(tokens) + self.block.per_sample(tokens)


# ---------------------------------------------------------------------------------- measuring a model


def measure_profile(cfg: ModelConfig, bf16: bool, prediction: str = "velocity") -> ActivationProfile:
    """`ActivationProfile` of `cfg` as trained: bf16 autocast on fp32 master weights when `bf16`, else fp32.

    The measurement runs at its own small grids, so the input size and base grid do not enter it: configs that
    differ only there (Stages 2-5) share one measurement."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("input_size", "base_grid", "extra")}
    return _measure_profile(json.dumps(fields, sort_keys=True), bf16, prediction)


@functools.lru_cache(maxsize=8)
def _measure_profile(fields: str, bf16: bool, prediction: str) -> ActivationProfile:
    cfg = ModelConfig(**json.loads(fields), input_size=MEASURE_GRIDS[0] * json.loads(fields)["patch"])
    knobs = ["depth", "pixel_depth"] if cfg.is_pixel_family else ["depth"]
    base_cfg = replace(cfg, **{k: 1 for k in knobs})
    base = _fit(base_cfg, bf16, prediction)
    full, kept, one_block = base["full"], base["kept"], {}
    for knob in knobs:
        plus = _fit(replace(base_cfg, **{knob: 2}), bf16, prediction)
        one_block[knob], one_kept = plus["full"] - base["full"], plus["kept"] - base["kept"]
        more = getattr(cfg, knob) - 1
        full, kept = full + one_block[knob] * more, kept + one_kept * more
    pixel = cfg.is_pixel_family
    return ActivationProfile(full=full, kept=kept, block=one_block["depth"], outside=base["outside"], depth=cfg.depth,
                             checkpointable=not pixel, pixel_block=one_block.get("pixel_depth", Affine()),
                             pixel_depth=cfg.pixel_depth if pixel else 0)


def _fit(cfg: ModelConfig, bf16: bool, prediction: str) -> dict[str, Affine]:
    model = _blank_model(cfg)
    points: dict[str, dict[tuple[int, int], float]] = {"full": {}, "kept": {}, "outside": {}}
    for grid in MEASURE_GRIDS:
        for batch in MEASURE_BATCHES:
            counter = measure_step(model, batch, grid, bf16, prediction)
            key = (batch, grid * grid)
            points["full"][key] = counter.total
            points["kept"][key] = counter.checkpointed
            points["outside"][key] = sum(counter.outside.values())
    return {name: Affine.fit(p) for name, p in points.items()}


def _blank_model(cfg: ModelConfig) -> nn.Module:
    """The model with zeroed parameters on the CPU, skipping initialisation (values do not change sizes)."""
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.train()


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every list of repeated blocks: `blocks`, or a pixel model's semantic and pixel blocks."""
    if hasattr(model, "pixel_blocks"):
        return [model.semantic.blocks, model.pixel_blocks]
    return [model.blocks]


def measure_step(model: nn.Module, batch: int, grid: int, bf16: bool, prediction: str) -> SavedBytes:
    """Run one micro-batch's forward and loss as trainer/loop.py does (flow/rectified_flow.py) and count what
    it saves."""
    from flow import Uniform
    from flow.rectified_flow import RectifiedFlow

    cfg = model.config
    side = grid * cfg.patch
    x1 = torch.zeros(batch, cfg.in_channels, side, side)
    cond = example_condition(cfg, batch, torch.bfloat16 if bf16 else torch.float32)
    counter = SavedBytes(exclude=model.parameters())
    counter.watch_blocks(b for blocks in block_lists(model) for b in blocks)
    gen = torch.Generator().manual_seed(0)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), GpuKernels(), warnings.catch_warnings():
        # RMSNorm of bf16 queries with an fp32 gain takes torch's unfused path, on CUDA as here; said once, not news.
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        loss = RectifiedFlow(Uniform(), prediction).loss(model, x1, cond, gen)
    counter.add([x1, *cond.values()])  # the loop holds its batch and conditioning through the backward
    del loss
    return counter


def example_condition(cfg: ModelConfig, batch: int, text_dtype: torch.dtype) -> dict[str, Tensor]:
    """Conditioning of the shapes the trainer passes: labels, or encoder states in the model dtype and a mask."""
    if cfg.conditioning == "class":
        return dict(labels=torch.zeros(batch, dtype=torch.long))
    return dict(text=torch.zeros(batch, cfg.text_len, cfg.text_dim, dtype=text_dtype),
                text_mask=torch.ones(batch, cfg.text_len, dtype=torch.bool))
