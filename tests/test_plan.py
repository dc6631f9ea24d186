"""The memory planner (planner/plan.py) and its activation measurement (planner/activation_memory.py): byte counts
against closed forms and hand counts, the FlashAttention stand-in against SDPA, the affine scaling, checkpointing
against torch.utils.checkpoint itself, the planner's choice, and the command line."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.shards import DatasetSpec, write_manifest
from models import model_config
from planner.activation_memory import (
    GpuKernels,
    SavedBytes,
    _blank_model,
    flash_attention,
    measure_profile,
    measure_step,
)
from planner.plan import (
    MemoryPlanError,
    Setting,
    check_memory,
    compose,
    data_shape,
    largest_divisor_at_most,
    make_plan,
    state_bytes,
)
from trainer.fast_path import checkpoint_blocks

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.size=debug", "model.patch=4", "data.image_size=32", "vae=identity", "precision=fp32"]
"""Overrides that make a real stage config a debug model on 32 px pixels: a plan in well under a second."""

def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planner", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------------- closed forms


def _ccdit_parameters(c) -> int:
    """ccDiT's parameters from its definition (models/ccdit.py), written out layer by layer."""
    d, k, e, hidden, out = c.dim, c.cond_dim, c.dim // c.heads, int(c.dim * c.mlp_ratio), c.patch**2 * c.in_channels
    linear = lambda i, o: i * o + o  # noqa: E731
    block = (linear(k, d) + linear(d, 6 * d) + linear(d, 3 * d) + 2 * e + linear(d, d)
             + linear(d, hidden) + linear(hidden, d))
    patch = c.in_channels * c.patch**2 * d + d
    final = linear(k, d) + linear(d, 2 * d) + linear(d, out)
    return patch + (c.num_classes + 1) * k + c.depth * block + final


def test_state_bytes_are_the_closed_forms_per_parameter():
    p, fused = 1_000_003, 400_000
    assert state_bytes(p) == dict(parameters=4 * p, gradients=4 * p, ddp_buckets=0, optimizer=8 * p, ema=4 * p)
    ddp = state_bytes(p, fused_wgrad=fused, world_size=8)
    assert ddp["ddp_buckets"] == 4 * (p - fused) and ddp["gradients"] == 4 * p  # main_grad replaces .grad
    sharded = state_bytes(p, world_size=8, shard_degree=8)
    share = math.ceil(p / 8)
    assert sharded == dict(parameters=4 * share, gradients=4 * share, ddp_buckets=0, optimizer=8 * share,
                           ema=4 * share)
    with pytest.raises(ValueError, match="shard_degree=3"):
        state_bytes(p, world_size=8, shard_degree=3)


def test_plan_rows_count_the_parameters_of_the_model_it_builds():
    plan = make_plan(compose(1, SMALL), 2)
    mcfg = model_config("ccDiT-debug/4", in_channels=3, input_size=32)
    n = _ccdit_parameters(mcfg)
    rows = {r.name: r.bytes for r in plan.rows()}
    assert rows["parameters (fp32 master weights)"] == 4 * n
    assert rows["gradients (fp32)"] == 4 * n and rows["DDP gradient buckets (fp32)"] == 4 * n
    assert rows["optimizer (AdamW, two fp32 moments)"] == 8 * n and rows["EMA (fp32 copy)"] == 4 * n
    assert "DDP gradient buckets (fp32)" not in {r.name for r in make_plan(compose(1, SMALL), 1).rows()}


# ---------------------------------------------------------------------------------- counting saved tensors


@pytest.mark.parametrize("bf16", [False, True])
def test_saved_bytes_of_linear_silu_linear_are_the_hand_count(bf16):
    b, d, h = 3, 8, 32
    net = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, d))
    x = torch.randn(b, d)
    with SavedBytes(exclude=net.parameters()) as saved, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(x)
    if bf16:  # bf16 copies of x and of fc2's weight (fc1's is not needed: x takes no gradient), fc1's output
        assert saved.total == 2 * (b * d + b * h + b * h + h * d)  # (SiLU's input) and SiLU's output (fc2's)
    else:  # x, fc1's output and SiLU's output; the fp32 weights are parameters, not counted
        assert saved.total == 4 * (b * d + b * h + b * h)


def test_gpu_kernels_run_layer_norm_in_fp32_under_autocast_as_cuda_does():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (16,)).dtype == torch.bfloat16  # CPU autocast's own policy
        with GpuKernels(), SavedBytes() as saved:
            y = F.layer_norm(x.requires_grad_(), (16,))
    assert y.dtype == torch.float32
    assert saved.total == 4 * 4 * 16 + 2 * 4 * 4  # the fp32 copy of x, and mean and rstd per row in fp32


# ---------------------------------------------------------------------------------- the FlashAttention stand-in


@pytest.mark.parametrize("masked", [False, True])
def test_flash_stand_in_matches_sdpa_values_and_gradients(masked):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    mask = torch.rand(2, 1, 1, 7, generator=gen) > 0.4 if masked else None
    if masked:
        mask[..., 0] = True  # every row keeps a key, as the models guarantee
    grad = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = flash_attention(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_flash_stand_in_saves_linear_not_quadratic_bytes():
    b, h, e = 2, 4, 16
    for n in (64, 128):
        q, k, v = (torch.randn(b, h, n, e, requires_grad=True) for _ in range(3))
        with SavedBytes() as stand_in:
            flash_attention(q, k, v)
        with SavedBytes() as math_path, sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(q, k, v)
        assert stand_in.total == 4 * (4 * b * h * n * e) + 4 * b * h * n  # q, k, v, out; fp32 log-sum-exp per row
        assert math_path.total >= 4 * b * h * n * n  # the probabilities the CPU's math path keeps


# ---------------------------------------------------------------------------------- the model's profile


@pytest.mark.parametrize("name", ["mmDiT-debug/4", "JointDiT-debug/4", "PixelDiT-debug/16"])
@pytest.mark.parametrize("bf16", [False, True])
def test_saved_bytes_are_affine_in_tokens_and_batch(name, bf16):
    """The profile is fitted at 4 and 16 tokens, batches 1 and 2, depth 1 and 2; it must predict the full-depth
    model at batch 3 and 36 tokens exactly (JointDiT's last block differs; PixelDiT has two kinds of blocks)."""
    cfg = model_config(name, depth=3, pixel_depth=3, input_size=8 * (16 if "Pixel" in name else 4))
    profile = measure_profile(cfg, bf16)
    direct = measure_step(_blank_model(cfg), 3, 6, bf16, "velocity")
    assert profile.full(3, 36) == pytest.approx(direct.total, abs=0.5)
    assert profile.kept(3, 36) == pytest.approx(direct.checkpointed, abs=0.5)


def test_a_ccdit_block_saves_the_hand_counted_bytes_per_token():
    """Per token, one ccDiT block under CUDA's bf16 autocast policy saves (d wide, h heads):
    LayerNorm 1: fp32 copy of x 4d + mean, rstd 8; modulate: LN output 4d; qkv: bf16 input 2d, output 6d (kept by
    v); QK RMSNorm on q and k (fp32 upcast and normalised copies, rstd): 2 (8d + 4h); SDPA: bf16 q and k 4d, output
    2d, log-sum-exp 4h; proj input 2d; gate x proj output 2d; LayerNorm 2 and modulate: 8d + 8; fc1 input 2d;
    SiLU input 8d; fc2 input 8d; gate x fc2 output 2d. In all 70d + 12h + 16 bytes."""
    cfg = model_config("ccDiT-S/2", in_channels=16, input_size=32)
    block = measure_profile(cfg, bf16=True).block
    assert block.c3 == pytest.approx(70 * cfg.dim + 12 * cfg.heads + 16, abs=1e-6)
    assert block.c1 == pytest.approx(0, abs=1e-6)  # nothing per token that a batch does not multiply


def test_checkpointing_keeps_the_block_inputs_and_recomputes_one_block():
    cfg = model_config("mmDiT-debug/4", depth=3)
    p = measure_profile(cfg, bf16=False)
    d, c, l1 = cfg.dim, cfg.text_dim, cfg.text_len + 1
    inputs = p.kept - p.outside  # each block's fp32 residual input; once, the modulation, text states and mask
    assert (inputs.c0, inputs.c1, inputs.c3) == pytest.approx((0, 0, cfg.depth * d * 4), abs=1e-6)
    assert inputs.c2 == pytest.approx(6 * d * 4 + l1 * c * 4 + l1, abs=1e-6)
    micro, tokens = 5, 64
    assert p.bytes(micro, tokens, checkpointing=True) == math.ceil(p.kept(micro, tokens) + p.block(micro, tokens))
    assert p.bytes(micro, tokens, checkpointing=True) < p.bytes(micro, tokens, checkpointing=False)


@pytest.mark.parametrize("bf16", [False, True])
def test_torch_checkpoint_saves_exactly_what_the_profile_keeps(bf16):
    """trainer/fast_path.py's real checkpointing: what autograd then saves is what is saved outside the blocks
    plus every block's inputs, the `kept` the plan uses."""
    model = _blank_model(model_config("mmDiT-debug/4", depth=3))
    plain = measure_step(model, 2, 4, bf16, "velocity")
    checkpoint_blocks(model)
    checkpointed = measure_step(model, 2, 4, bf16, "velocity")
    assert checkpointed.total == plain.checkpointed < plain.total


# ---------------------------------------------------------------------------------- the planner


def test_chosen_micro_batch_fits_and_the_next_larger_does_not():
    plan = make_plan(compose(1, [*SMALL, "train.batch_size=384", "train.grad_accum=1"]), 2)
    per_gpu = plan.per_gpu_batch()
    divisors = [m for m in range(1, per_gpu + 1) if per_gpu % m == 0]
    checked = 0
    for micro in divisors[1:-1]:
        for checkpointing in (True, False):
            budget = plan.total(Setting(micro, per_gpu // micro, checkpointing)) + 1
            tight = replace(plan, gpu_bytes=budget)
            choice = tight.choice()
            needs = not tight.fits_with(replace(plan.setting, checkpointing=False))
            assert choice.checkpointing == needs
            assert tight.fits_with(choice)
            bigger = [m for m in divisors if m > choice.micro]
            if bigger:
                assert not tight.fits_with(Setting(bigger[0], per_gpu // bigger[0], choice.checkpointing))
            assert choice.micro * plan.gpus * choice.grad_accum == plan.batch_size
            checked += 1
    assert checked >= 4
    roomy = replace(plan, gpu_bytes=10**15).choice()
    assert (roomy.micro, roomy.grad_accum, roomy.checkpointing) == (per_gpu, 1, False)


def test_largest_divisor_at_most_is_the_brute_force_one():
    for n in range(1, 200):
        for cap in range(1, n + 2):
            assert largest_divisor_at_most(n, cap) == max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def test_a_huge_batch_is_planned_in_bounded_time():
    """train.batch_size=10**12 on 8 GPUs: 1.25e11 = 2^9 x 5^12 per GPU. The old search tried every integer up to
    it (hours); the choice must come at once and be the largest divisor that fits, the divisors listed from the
    factorisation (an independent reference)."""
    import signal

    plan = make_plan(compose(1, [*SMALL, "train.batch_size=1000000000000", "train.grad_accum=1"]), 8)
    per_gpu = plan.per_gpu_batch()
    assert per_gpu == 2**9 * 5**12
    divisors = sorted(2**a * 5**b for a in range(10) for b in range(13))

    def too_slow(*_):
        raise TimeoutError("the planner's divisor search did not finish in 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        choice = plan.choice()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert per_gpu % choice.micro == 0 and plan.fits_with(choice)
    bigger = divisors[divisors.index(choice.micro) + 1]
    assert not plan.fits_with(Setting(bigger, per_gpu // bigger, choice.checkpointing))


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e300"])
def test_gpu_memory_must_be_a_finite_positive_number(value):
    result = _run("stage=1", *SMALL, f"+gpu_memory_gb={value}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"+gpu_memory_gb={value}: expected a positive, finite number of GB" in result.stderr


@pytest.mark.slow
def test_pixel_families_are_planned_without_checkpointing():
    """trainer/fast_path.py cannot checkpoint PixelDiT (no `model.blocks`): the planner shrinks the micro-batch."""
    cfg = compose(2, ["model=pixeldit", "model.size=debug", "data.image_size=64", "vae=identity",
                      "text_encoder=minilm", "train.batch_size=64", "train.grad_accum=1"])
    plan = make_plan(cfg, 1)
    tight = replace(plan, gpu_bytes=plan.total(Setting(8, 8, False)) + 1)
    assert not tight.fits and tight.choice() == Setting(8, 8, False)
    with pytest.raises(ValueError, match="train.activation_checkpointing=true"):
        make_plan(compose(2, ["model=pixeldit", "model.size=debug", "data.image_size=64", "vae=identity",
                              "text_encoder=minilm", "train.activation_checkpointing=true"]), 1)


def test_data_shape_from_the_manifest_or_from_image_size(tmp_path):
    spec = DatasetSpec(kind="labels", latent_shape=(16, 8, 8), image_size=64, vae={"id": "x"}, num_classes=10)
    write_manifest(tmp_path, spec, records_per_shard=10)
    shape = data_shape(compose(1, [f"data.path={tmp_path}"]))
    assert (shape.latent_shape, shape.num_classes) == ((16, 8, 8), 10)
    assert data_shape(compose(4, [])).latent_shape == (16, 64, 64)
    assert data_shape(compose(5, ["vae=identity", "data.image_size=48"])).latent_shape == (3, 48, 48)
    with pytest.raises(ValueError, match=r"data\.path=\?\?\?.*data\.image_size"):
        data_shape(compose(2, ["data.image_size=null"]))
    with pytest.raises(ValueError, match="not a multiple"):
        data_shape(compose(2, ["data.image_size=260"]))


def test_the_plan_of_non_square_data_is_the_model_the_trainer_trains(tmp_path):
    """Unbucketed 32x48 latents, which the trainer takes (one forward of the model it builds, below): the plan
    (and check_memory, which the trainer runs on CUDA before anything else) describes that model at that size,
    its parameters and its (32 / 4) x (48 / 4) = 96 tokens a sample, instead of refusing non-square data."""
    from core.conditioning import ClassConditioning
    from models import build_model
    from trainer import builders

    spec = DatasetSpec(kind="labels", latent_shape=(3, 32, 48), image_size=48, vae={"id": "identity"}, num_classes=4)
    write_manifest(tmp_path, spec, records_per_shard=10)
    cfg = compose(1, [*SMALL, f"data.path={tmp_path}", "train.batch_size=8"])
    plan = check_memory(cfg, 1, torch.device("cpu"))
    model = build_model(builders.build_model_config(cfg, spec, ClassConditioning(4, None, 0.1), None))
    out = model(torch.zeros(2, 3, 32, 48), torch.rand(2), labels=torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 32, 48)
    assert plan.tokens == 96 and "3x32x48 latents (96 tokens)" in plan.title
    assert plan.state_rows[0].bytes == 4 * sum(p.numel() for p in model.parameters())


def test_stored_text_features_keep_the_encoder_off_the_gpu(embedded_data, tmp_path):
    """Stage 4 on bucketed shards with stored text features: the trainer builds no encoder for the step (its
    conditioning reads the stored states; previews load one on the CPU), so the plan counts none; with
    data.text_features=false the trainer loads it on the device, and the plan counts its parameters (the loaded
    encoder's) in the configured dtype.
    The activations are planned at the largest bucket the run trains on (40x40: 64 tokens at Stage 4's patch 5;
    35x45 and 45x35 hold 63)."""
    from core.conditioning import FeatureConditioning
    from tests.stages import stage_config
    from trainer import builders

    cfg = stage_config(4, embedded_data, tmp_path, "device=cpu", "train.init_from=null")
    spec = builders.read_data_spec(cfg)
    conditioning = builders.build_conditioning(cfg, spec, torch.device("cpu"), torch.float32)
    assert isinstance(conditioning, FeatureConditioning) and conditioning.encoder is None
    plan = make_plan(cfg, 1)
    encoder = next(r for r in plan.rows() if r.name.startswith("text encoder"))
    assert encoder.bytes == 0 and "not on the GPU" in encoder.how
    assert plan.tokens == 64 and "the largest of 3 buckets" in plan.title
    wide = make_plan(stage_config(4, embedded_data, tmp_path, "device=cpu", "train.init_from=null",
                                  "data.buckets=[35x45,45x35]"), 1)  # the buckets the run trains on: 63 tokens
    assert wide.tokens == 63 and "the largest of 2 buckets" in wide.title

    encoding = stage_config(4, embedded_data, tmp_path, "device=cpu", "train.init_from=null",
                            "data.text_features=false")
    online = builders.build_conditioning(encoding, spec, torch.device("cpu"), torch.float32)
    parameters = sum(p.numel() for p in online.encoder.parameters())
    counted = next(r for r in make_plan(encoding, 1).rows() if r.name.startswith("text encoder"))
    dtype = getattr(torch, encoding.text_encoder.dtype or "bfloat16")  # null: bf16 on CUDA
    assert counted.bytes == dtype.itemsize * parameters


@pytest.mark.slow
def test_the_reference_stage_defaults_fit_an_80_gb_gpu_by_the_plan():
    for stage in range(1, 6):
        plan = make_plan(compose(stage, []), 8, gpu_bytes=80 * 10**9)
        assert plan.fits, plan.report()
        assert plan.choice() == plan.setting  # the defaults are what the planner would choose


@pytest.mark.slow
def test_check_memory_raises_with_the_table_and_the_keys_to_change():
    cfg = compose(1, ["train.grad_accum=1", "train.activation_checkpointing=false"])
    with pytest.raises(MemoryPlanError) as err:
        check_memory(cfg, 8, torch.device("cpu"))
    assert "| **total** |" in str(err.value) and "train.activation_checkpointing=true" in str(err.value)
    assert check_memory(compose(1, ["train.memory_check=false"]), 8, torch.device("cpu")) is None
    assert check_memory(compose(1, []), 8, torch.device("cpu")).fits


# ---------------------------------------------------------------------------------- the command line


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom planner.plan import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps('torch' in sys.modules))")
    result = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "+gpus=G" in result.stdout and "default 8" in result.stdout and "else 80" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) is False
    assert _run("--help").returncode == 0


@pytest.mark.slow
def test_cli_prints_the_table_for_stage_2():
    result = _run("stage=2")
    assert result.returncode == 0, result.stderr
    for line in ("mmDiT-XL/2", "| per GPU (rank 0) | GiB | how |", "text encoder (frozen, bfloat16)", "**total**",
                 "As configured: fits", "train.activation_checkpointing=false train.grad_accum=20"):
        assert line in result.stdout


def test_cli_unknown_key_fails_naming_it():
    result = _run("stage=2", "train.no_such_key=1")
    assert result.returncode == 2
    assert "train.no_such_key" in result.stderr and "Traceback" not in result.stderr
    bad_stage = _run("stage=7")
    assert bad_stage.returncode == 2 and "stage=7" in bad_stage.stderr
