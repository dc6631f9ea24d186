"""A CPU stand-in for the parts of Transformer Engine (TE) this repo calls, keeping the contract TE's source states.

Read at NVIDIA/TransformerEngine d0067d0 (2026-08-22, build_tools/VERSION.txt 2.20.0.dev0). Paths below are under
`transformer_engine/`; line numbers are of that commit. `install(monkeypatch)` registers this module's pieces as
`transformer_engine.pytorch` (Linear, fp8_autocast, autocast, distributed.checkpoint) and
`transformer_engine.common.recipe`, and makes the machine look like an FP8 GPU of a chosen compute capability, so the
repo's own TE code paths run against it (models/linear.py's te.Linear, trainer/precision.py's recipes and autocast,
trainer/fast_path.py's checkpoint).

Behaviour by behaviour, what the stand-in does and where TE's source says TE does it:

1. A global FP8 state read at forward time. `fp8_autocast` / `autocast` set a process-wide state on entry and restore
   the previous one on exit (pytorch/quantization.py:415 FP8GlobalStateManager, :730-770 autocast_enter, :1037-1065
   autocast.__enter__/__exit__; :941 fp8_autocast is the deprecated spelling of autocast). te.Linear reads it on
   every forward (pytorch/module/linear.py:1924 prepare_forward -> module/base.py:1532-1536 init_fp8_metadata: `fp8 =
   FP8GlobalStateManager.is_fp8_enabled()`, kept as self.fp8). Outside the autocast the same layer runs its
   high-precision GEMM. What the forward saves for the backward differs between the two: the FP8 path the quantized
   input and weight, each as its data and scale-inverse tensors (module/linear.py:1433-1434 ->
   quantized_tensor.py:285-305 prepare_for_saving -> tensor/storage/float8_tensor_storage.py:161-167), the other the
   input and weight themselves (module/linear.py:773-786). So a forward recomputed outside the autocast saves other
   tensors than the one it replays, which torch.utils.checkpoint refuses (CheckpointError). Here:
   `FP8GlobalStateManager`, `autocast`, `fp8_autocast`; the FP8 path saves four tensors (float8_e4m3fn data and fp32
   scale-inverse, twice), the other two.
2. The shape rule, per recipe (rows: the product of the input's leading dimensions):
   - every FP8 forward: rows % 8 and in_features % 16 for the input, out_features % 8 and in_features % 16 for the
     weight, else ValueError (module/linear.py:375-376 -> utils.py:614-624 assert_dim_for_fp8_exec);
   - per-tensor scaling (Float8CurrentScaling, DelayedScaling) on Hopper, which runs FP8 GEMMs only as TN: the wgrad
     GEMM (layout "NT", module/linear.py:1262) reduces over the rows and the dgrad GEMM over out_features, and both
     become leading dimensions of transposed FP8 operands that cuBLASLt needs to be multiples of 16
     (common/gemm/cublaslt_gemm.cu:128-162 for A, :219-254 for B) -> in training, rows % 16 and out_features % 16,
     failing in the backward. The stand-in models per-tensor recipes as on Hopper (where `auto` picks them);
   - MXFP8BlockScaling: both flattened dimensions of every quantized tensor % 32 (pytorch/csrc/quantizer.cpp:1514-1516
     create_tensor, :1861-1863 get_scale_shape; tensor/mxfp8_tensor.py:125-132 is_quantizable; constants.py:175
     MXFP8_BLOCK_SCALING_SIZE = 32): the input [rows, in] and weight [out, in] in the forward, grad_output
     [rows, out] in the backward.
   Here: `ShapeRuleError` (a ValueError) raised where TE fails, nothing checked at construction (TE checks none).
3. Extra state. get_extra_state (module/base.py:1354-1417) returns an empty uint8 tensor when the layer's last forward
   ran outside FP8 (:1387-1389) or its recipe is stateless (:1391-1393; Float8CurrentScaling and MXFP8BlockScaling are,
   _extra_state.py:55-62, :71-73), and for DelayedScaling a pickle of {recipe, scale and amax_history forward and
   backward, extra_fp8_variables} as uint8 (:1395-1417). set_extra_state (module/base.py:1419-1435) ignores an empty
   tensor; a pickle that holds delayed-scaling state it refuses with a RuntimeError unless the environment sets
   NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (_extra_state.py:17, :88-110 advisory and should_load_extra_state_pickle,
   :113-187 the payload's classification, which a payload with a global reference or delayed-scaling keys never
   passes). That refusal arrived with commit 81412e4 (first in tag v2.18); TE < 2.18 pickled {recipe, ...} for every
   recipe and unpickled what it was given. The stand-in adds one value of its own to extra_fp8_variables, `forwards`
   (its FP8 forward count), so a test can see a restored state continue.
   Delayed scaling's state: each FP8 forward (not a recompute) records the amax of input, weight and output into
   amax_history[0]; at the exit of the outermost autocast with grad enabled the scale becomes fp8_max / max(history)
   and the history rolls (quantization.py:772-783 autocast_exit -> :656 reduce_and_update_fp8_tensors; :1067-1073
   _update_amax_history; :1092-1133 _default_sf_compute). Recipe defaults: common/recipe/__init__.py:253-256
   (margin 0, HYBRID, history 1024, "max"), E4M3's largest value 448.
4. `no_torch_dynamo`: te.Linear.forward is decorated @no_torch_dynamo() (module/linear.py:1872), which is
   torch._dynamo.disable(recursive=True) (jit.py:56-73): torch.compile cuts its graph at every call and traces
   nothing inside.
5. fuse_wgrad_accumulation: the backward adds the weight gradient into `weight.main_grad` (module/linear.py:749-757
   reads it; :1227-1262 the wgrad GEMM writes out=main_grad with accumulate=True when is_first_microbatch is None) and
   hands autograd no weight gradient unless the weight has `grad_added_to_main_grad` (:1352-1370); the bias gradient
   is returned as usual. This holds inside and outside FP8.
6. GEMM precision outside FP8: fp32 operands run as TF32 (common/gemm/cublaslt_gemm.cu:445-449); the output is in
   torch autocast's dtype when autocast is on, else the input's, and outside autocast an input whose dtype is not the
   parameters' is a TypeError (module/base.py:1482-1500 set_activation_dtype). TF32 is emulated by rounding each fp32
   operand to 10 mantissa bits.
7. te.distributed.checkpoint (distributed.py:659-815), non-reentrant path (use_reentrant=False, which the repo
   passes; TE's default is the reentrant one, :703): the function is @torch._disable_dynamo (:659); it captures
   is_fp8_enabled() and the recipe at the forward and recomputes under autocast(enabled=fp8, recipe=that), with the
   forward's torch autocast state and RNG state (:789-815); delayed-scaling layers recompute with the scale their
   forward used (quantization.py:785-834 copy / get_old_fp8_meta_tensors_for_recompute; module/base.py:1601-1603,
   :1635-1636). The stand-in runs its recompute through
   torch.utils.checkpoint with that context, so unlike TE's own frame a mismatch between forward and recompute raises.
8. A frozen weight (requires_grad False, as a LoRA run's base layers): the forward records whether the weight requires
   grad (module/linear.py:2008 weight_requires_grad=weight_tensor.requires_grad, :712 requires_wgrad), and the
   backward computes no weight gradient for one that does not (:954, :1354) and never reads its main_grad, which is
   bound only for a weight that requires grad (:749-757, :836-845). Here: no wgrad and no main_grad access for it.

Not modelled: quantization of grad_output / grad_input (the backward GEMMs use the saved quantized operands and a
high-precision grad_output), amax reduction across ranks, FP8 weight caching, userbuffers, the reentrant checkpoint,
Blackwell's non-TN per-tensor GEMMs.
"""

import importlib.machinery
import os
import pickle
import pickletools
import sys
import types
from collections import deque
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

E4M3_MAX = 448.0
MXFP8_BLOCK = 32
UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
_DELAYED_KEYS = {"scale_fwd", "amax_history_fwd", "scale_bwd", "amax_history_bwd"}


class ShapeRuleError(ValueError):
    """A tensor shape an FP8 GEMM of the active recipe refuses (TE raises ValueError or an NVTE_CHECK error)."""


# ---- recipes (common/recipe/__init__.py) ----------------------------------------------------------------------


@dataclass
class DelayedScaling:
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@dataclass
class Float8CurrentScaling:
    pass


@dataclass
class MXFP8BlockScaling:
    pass


def _stateless(recipe) -> bool:
    return isinstance(recipe, (Float8CurrentScaling, MXFP8BlockScaling))


# ---- the global state and its autocast (pytorch/quantization.py) ----------------------------------------------


class FP8GlobalStateManager:
    """Process-wide, as TE's is (quantization.py:415): class attributes, reset by `install`."""

    enabled = False
    recipe = None
    depth = 0
    delayed_layers: list["Linear"] = []
    checkpoint_region = False  # inside te.distributed.checkpoint's forward (distributed.py:241-276)
    recompute_phase = False

    @classmethod
    def reset(cls) -> None:
        cls.enabled, cls.recipe, cls.depth, cls.delayed_layers = False, None, 0, []
        cls.checkpoint_region = cls.recompute_phase = False

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.enabled

    @classmethod
    def get_fp8_recipe(cls):
        return cls.recipe if cls.recipe is not None else DelayedScaling()  # TE's default recipe is delayed


class autocast:  # noqa: N801 (TE's name)
    def __init__(self, enabled: bool = True, calibrating: bool = False, recipe=None, amax_reduction_group=None,
                 _graph: bool = False):
        self.enabled, self.recipe = enabled, recipe

    def __enter__(self):
        s = FP8GlobalStateManager
        self.saved = (s.enabled, s.recipe)
        s.enabled, s.recipe = self.enabled, self.recipe if self.recipe is not None else DelayedScaling()
        s.depth += 1
        return self

    def __exit__(self, *exc):
        s = FP8GlobalStateManager
        s.enabled, s.recipe = self.saved
        s.depth -= 1
        if self.enabled and s.depth == 0 and torch.is_grad_enabled():
            for layer in s.delayed_layers:
                layer._update_delayed_scale()
            s.delayed_layers = []


def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe=None, fp8_group=None,
                 _graph: bool = False) -> autocast:
    return autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe, amax_reduction_group=fp8_group)


# ---- quantization ---------------------------------------------------------------------------------------------


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 10 mantissa bits (round to nearest even); other dtypes as they are."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def _per_tensor(t: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    data = (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return data, (1.0 / scale).float()


def _current_scale(t: torch.Tensor) -> torch.Tensor:
    amax = t.detach().abs().amax().float()
    return torch.where(amax > 0, E4M3_MAX / amax, torch.ones_like(amax))


def _mx_blocks(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8: one power-of-two scale per 32 consecutive values of the last dimension (E8M0)."""
    blocks = t.float().reshape(*t.shape[:-1], t.shape[-1] // MXFP8_BLOCK, MXFP8_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(2.0**-126)
    scale_inv = torch.exp2(torch.floor(torch.log2(amax)) - 8)  # E4M3's largest power of two is 2^8
    data = (blocks / scale_inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return data.reshape(t.shape), scale_inv


def _dequantize(data: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    if scale_inv.dim() == 0:
        return data.float() * scale_inv
    blocks = data.float().reshape(*data.shape[:-1], data.shape[-1] // MXFP8_BLOCK, MXFP8_BLOCK)
    return (blocks * scale_inv).reshape(data.shape)


def _check(recipe, what: str, rows: int, cols: int, row_multiple: int, col_multiple: int) -> None:
    if rows % row_multiple or cols % col_multiple:
        raise ShapeRuleError(f"FP8 ({type(recipe).__name__}) {what}: needs its leading dimensions' product divisible "
                             f"by {row_multiple} and its last dimension by {col_multiple}, got {rows} x {cols}")


def _check_forward(recipe, x2d: torch.Tensor, weight: torch.Tensor) -> None:
    rows, cols = x2d.shape
    if isinstance(recipe, MXFP8BlockScaling):
        _check(recipe, "input", rows, cols, MXFP8_BLOCK, MXFP8_BLOCK)
        _check(recipe, "weight", *weight.shape, MXFP8_BLOCK, MXFP8_BLOCK)
    _check(recipe, "input", rows, cols, 8, 16)
    _check(recipe, "weight", *weight.shape, 8, 16)


def _check_backward(recipe, rows: int, out_features: int) -> None:
    if isinstance(recipe, MXFP8BlockScaling):
        _check(recipe, "grad_output", rows, out_features, MXFP8_BLOCK, MXFP8_BLOCK)
    else:  # Hopper's TN-only FP8 GEMMs: rows lead in wgrad, out_features in dgrad
        _check(recipe, "wgrad/dgrad GEMM", rows, out_features, 16, 16)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, layer, recipe, scale):
        ctx.layer, ctx.recipe, ctx.out_dtype = layer, recipe, x2d.dtype
        if recipe is None:  # high precision
            ctx.save_for_backward(x2d, weight)
            w = weight.to(x2d.dtype)
            out = _tf32(x2d) @ _tf32(w).t()
        else:
            if isinstance(recipe, MXFP8BlockScaling):
                (xq, xs), (wq, ws) = _mx_blocks(x2d), _mx_blocks(weight)
            else:
                x_scale = scale[0] if scale is not None else _current_scale(x2d)
                w_scale = scale[1] if scale is not None else _current_scale(weight)
                (xq, xs), (wq, ws) = _per_tensor(x2d, x_scale), _per_tensor(weight, w_scale)
            ctx.save_for_backward(xq, xs, wq, ws)
            out = _dequantize(xq, xs) @ _dequantize(wq, ws).t()
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        layer, recipe = ctx.layer, ctx.recipe
        if recipe is None:
            x, weight = ctx.saved_tensors
            x, w = _tf32(x.float()), _tf32(weight.float())
            g = _tf32(grad_out.float())
        else:
            _check_backward(recipe, grad_out.shape[0], grad_out.shape[1])
            xq, xs, wq, ws = ctx.saved_tensors
            x, w, g = _dequantize(xq, xs), _dequantize(wq, ws), grad_out.float()
        grad_x = (g @ w).to(ctx.out_dtype)
        grad_w = None
        if not layer.weight.requires_grad:  # 8: no wgrad GEMM, main_grad untouched
            pass
        elif layer.fuse_wgrad_accumulation:
            wgrad = g.t() @ x
            layer.weight.main_grad.add_(wgrad.to(layer.weight.main_grad.dtype))
            if hasattr(layer.weight, "grad_added_to_main_grad"):
                layer.weight.grad_added_to_main_grad = True
                grad_w = torch.zeros_like(layer.weight)
        else:
            grad_w = (g.t() @ x).to(layer.weight.dtype)
        grad_b = g.sum(0).to(layer.bias.dtype) if layer.bias is not None else None
        return grad_x, grad_w, grad_b, None, None, None


# ---- te.Linear (pytorch/module/linear.py) ---------------------------------------------------------------------


class Linear(nn.Linear):
    instances: list["Linear"] = []

    def __init__(self, in_features, out_features, bias=True, params_dtype=torch.float32,
                 fuse_wgrad_accumulation=False, **_):
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.fp8 = self.fp8_checkpoint = False
        self.recipe = None
        self.forwards = 0
        self._reset_delayed_state(DelayedScaling().amax_history_len)
        self._recompute_scales: deque = deque()
        Linear.instances.append(self)

    def _reset_delayed_state(self, history_len: int) -> None:
        self.scale_fwd = torch.ones(3)  # input, weight, output (one GEMM)
        self.amax_history_fwd = torch.zeros(history_len, 3)
        self.scale_bwd, self.amax_history_bwd = torch.ones(2), torch.zeros(history_len, 2)

    @torch._dynamo.disable(recursive=True)
    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        state = FP8GlobalStateManager
        self.fp8 = self.fp8_checkpoint = state.is_fp8_enabled()
        recipe = state.get_fp8_recipe() if self.fp8 else None
        if recipe is not None and type(recipe) is not type(self.recipe):
            if isinstance(recipe, DelayedScaling):
                self._reset_delayed_state(recipe.amax_history_len)
            self.recipe = recipe
        if not torch.is_autocast_enabled(inp.device.type) and inp.dtype != self.weight.dtype:
            raise TypeError("Data types for parameters must match when outside of autocasted region. Found input "
                            f"dtype: {inp.dtype} and 'weight' dtype: {self.weight.dtype}")
        if torch.is_autocast_enabled(inp.device.type):
            inp = inp.to(torch.get_autocast_dtype(inp.device.type))
        x2d = inp.reshape(-1, inp.shape[-1])
        scale = None
        if recipe is not None:
            _check_forward(recipe, x2d, self.weight)
            if isinstance(recipe, DelayedScaling):
                scale = self._delayed_scale(x2d)
            if not state.recompute_phase:
                self.forwards += 1
        with torch.autocast(inp.device.type, enabled=False):
            out = _LinearFunction.apply(x2d, self.weight, self.bias, self, recipe, scale)
        if recipe is not None and isinstance(recipe, DelayedScaling) and not state.recompute_phase:
            self.amax_history_fwd[0, 2] = torch.maximum(self.amax_history_fwd[0, 2], out.detach().abs().amax().float())
        return out.reshape(*inp.shape[:-1], self.out_features)

    def _delayed_scale(self, x2d: torch.Tensor) -> torch.Tensor:
        """The scales of input and weight this forward uses: the forward's own in a recompute, else the current ones
        (kept for a recompute inside a checkpoint), recording this forward's amaxes for the next update."""
        state = FP8GlobalStateManager
        if state.recompute_phase:
            return self._recompute_scales.popleft()
        scale = self.scale_fwd[:2].clone()
        if state.checkpoint_region and self.training:
            self._recompute_scales.append(scale)
        amax = torch.stack([x2d.detach().abs().amax().float(), self.weight.detach().abs().amax().float()])
        self.amax_history_fwd[0, :2] = torch.maximum(self.amax_history_fwd[0, :2], amax)
        if self not in state.delayed_layers:
            state.delayed_layers.append(self)
        return scale

    def _update_delayed_scale(self) -> None:
        amax = self.amax_history_fwd.max(dim=0).values
        scale = E4M3_MAX / amax / 2**self.recipe.margin
        self.scale_fwd = torch.where((amax > 0) & torch.isfinite(amax), scale, self.scale_fwd)
        self.amax_history_fwd = torch.roll(self.amax_history_fwd, -1, 0)
        self.amax_history_fwd[0] = 0

    def get_extra_state(self) -> torch.Tensor:
        if not (self.fp8_checkpoint or self.fp8) or self.recipe is None or _stateless(self.recipe):
            return torch.empty(0, dtype=torch.uint8)
        state = {key: getattr(self, key).clone() for key in _DELAYED_KEYS}
        state |= dict(recipe=self.recipe,
                      extra_fp8_variables=dict(fp8_checkpoint=True, num_gemms=1, forwards=self.forwards))
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is None:
            return
        if not isinstance(state, torch.Tensor):
            raise RuntimeError("Unsupported checkpoint format.")
        if state.numel() == 0:
            return
        data = state.detach().cpu().numpy().tobytes()
        if not _needs_unpickling(data):
            return
        if os.environ.get(UNSAFE_PICKLE_ENV, "0") != "1":
            raise RuntimeError(f"Refusing to load pickled Transformer Engine extra state for {type(self).__name__}. "
                               "Delayed-scaling FP8 metadata can be stored as a Python pickle, and loading it can "
                               "execute arbitrary code. To load it anyway, set "
                               f"{UNSAFE_PICKLE_ENV}=1.")
        loaded = pickle.loads(data)
        self.recipe = loaded["recipe"]
        self.forwards = loaded["extra_fp8_variables"].get("forwards", 0)
        for key in _DELAYED_KEYS:
            setattr(self, key, loaded[key].clone())


def _needs_unpickling(data: bytes) -> bool:
    """_extra_state.py:113-187 in short: a payload with no global reference and no delayed-scaling key is ignored."""
    ops = list(pickletools.genops(data))
    has_global = any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in ops)
    return has_global or any(isinstance(arg, str) and arg in _DELAYED_KEYS for _, arg, _ in ops)


def saved_forwards(extra_state: torch.Tensor) -> int:
    """The stand-in's FP8 forward count inside a saved delayed-scaling extra state (0 for an empty one)."""
    if not extra_state.numel():
        return 0
    return pickle.loads(extra_state.numpy().tobytes())["extra_fp8_variables"]["forwards"]


# ---- te.distributed.checkpoint (pytorch/distributed.py:659-816) -----------------------------------------------


class _Phase:
    """distributed.py:241-276 activation_recompute_forward: marks the checkpointed forward and its recompute."""

    def __init__(self, recompute: bool):
        self.recompute = recompute

    def __enter__(self):
        s = FP8GlobalStateManager
        self.saved = (s.checkpoint_region, s.recompute_phase)
        s.checkpoint_region, s.recompute_phase = True, self.recompute

    def __exit__(self, *exc):
        FP8GlobalStateManager.checkpoint_region, FP8GlobalStateManager.recompute_phase = self.saved


def _noop_contexts():
    return nullcontext(), nullcontext()


@contextmanager
def _entered(*contexts):
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


@torch._disable_dynamo
def checkpoint(function, *args, **kwargs):
    use_reentrant = kwargs.pop("use_reentrant", True)
    for key in ("distribute_saved_activations", "tp_group", "get_rng_state_tracker", "determinism_check", "debug"):
        kwargs.pop(key, None)
    if use_reentrant:
        raise NotImplementedError("the stand-in models te.distributed.checkpoint's non-reentrant path only")
    user_forward, user_recompute = kwargs.pop("context_fn", _noop_contexts)()
    fp8 = FP8GlobalStateManager.is_fp8_enabled()
    recipe = FP8GlobalStateManager.get_fp8_recipe() if fp8 else None

    def contexts():
        return (_entered(_Phase(recompute=False), user_forward),
                _entered(_Phase(recompute=True), user_recompute, autocast(enabled=fp8, recipe=recipe)))

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)


# ---- installing it ----------------------------------------------------------------------------------------------


def _modules() -> dict[str, types.ModuleType]:
    this = sys.modules[__name__]
    root, common, recipe = (types.ModuleType(n) for n in (
        "transformer_engine", "transformer_engine.common", "transformer_engine.common.recipe"))
    pytorch, distributed = types.ModuleType("transformer_engine.pytorch"), types.ModuleType(
        "transformer_engine.pytorch.distributed")
    recipe.DelayedScaling, recipe.Float8CurrentScaling = DelayedScaling, Float8CurrentScaling
    recipe.MXFP8BlockScaling = MXFP8BlockScaling
    distributed.checkpoint = checkpoint
    pytorch.Linear, pytorch.fp8_autocast, pytorch.autocast = Linear, fp8_autocast, autocast
    pytorch.LayerNormLinear, pytorch.LayerNormMLP = LayerNormLinear, LayerNormMLP
    pytorch.distributed, pytorch.checkpoint, pytorch.standin = distributed, checkpoint, this
    root.pytorch, root.common, common.recipe = pytorch, common, recipe
    modules = (root, common, recipe, pytorch, distributed)
    for module in modules:  # as an installed package's modules have: importlib.util.find_spec (peft's check) reads it
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    return {m.__name__: m for m in modules}


def install(monkeypatch, capability: tuple[int, int] = (9, 0)) -> None:
    """Make `import transformer_engine.pytorch` give this stand-in, and the machine look like a GPU of compute
    capability `capability` to the repo ((9, 0): Hopper, `auto` picks current scaling; (10, 0): Blackwell, MXFP8)."""
    import models.linear as linear

    for name, module in _modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(linear, "te_unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    FP8GlobalStateManager.reset()
    Linear.instances = []


class LayerNormLinear(nn.Module):
    """TE exports it beside Linear (pytorch/__init__.py); this repo never builds one. Present so that code which
    checks a layer against TE's classes (peft's LoRA dispatch) finds them."""


class LayerNormMLP(nn.Module):
    """As LayerNormLinear: exported by TE, never built here."""


StandInTELinear = Linear
"""The name the tests use for it."""
