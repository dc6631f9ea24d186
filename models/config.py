"""ModelConfig: every number that defines a network, saved with each checkpoint so tools rebuild it."""

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Family = Literal["ccdit", "mmdit", "jointdit", "pixeldit", "mmpixeldit", "pixart"]
Conditioning = Literal["class", "text"]

# What each family can be conditioned on; the first is its default.
CONDITIONINGS: dict[str, tuple[str, ...]] = {
    "ccdit": ("class",),
    "mmdit": ("text",),
    "jointdit": ("text", "class"),
    "pixeldit": ("text", "class"),
    "mmpixeldit": ("text", "class"),
    "pixart": ("text",),
}

PIXART_TIME_CHANNELS = 256
"""The width of the timestep sinusoid of PixArt-alpha's TimestepEmbedding (diffusers fixes it at 256)."""


def default_conditioning(family: str) -> str:
    """The conditioning a family takes when none is configured."""
    if family not in CONDITIONINGS:
        raise ValueError(f"model.family must be one of {', '.join(CONDITIONINGS)}, got {family!r}")
    return CONDITIONINGS[family][0]


@dataclass
class ModelConfig:
    family: Family
    """ccdit: class-conditional DiT (Stage 1); mmdit: PixArt-style cross-attention (Stages 2-5);
    jointdit: SD3-style joint attention over text and image tokens; pixeldit / mmpixeldit: a ccDiT-or-mmDiT /
    a JointDiT as the patch-level semantic stream plus PixelDiT's pixel-level stream (models/pixeldit.py);
    pixart: PixArt-alpha's transformer exactly as diffusers' PixArtTransformer2DModel computes it
    (models/pixart.py), so `python -m app.export --format pixart` hands it to stock diffusers."""
    conditioning: Conditioning | None = None
    """class or text (None: the family's default, CONDITIONINGS). ccdit takes class labels only, mmdit text
    only; for pixeldit, class picks a ccDiT semantic stream and text an mmDiT one."""
    size: str = "debug"
    """Named size (S, B, L, XL, debug): a label for logs and checkpoints; the numbers below rule."""
    dim: int = 64
    """Transformer width."""
    depth: int = 2
    """Number of blocks."""
    heads: int = 4
    """Attention heads; dim / heads is the head width."""
    patch: int = 2
    """Patch side in input pixels (latent pixels for latent models)."""
    in_channels: int = 16
    """Input channels: 16 for SD3 VAE latents, 3 for pixel space."""
    input_size: int = 32
    """Default input side (latent or pixel grid). Other sizes run too; positions interpolate."""
    base_grid: int | None = None
    """Token grid side at which position steps are 1 (None: input_size // patch). Keep it fixed when
    moving to a new resolution so positions interpolate rather than extrapolate."""
    mlp_ratio: float = 4.0
    """MLP hidden width / dim."""
    cond_dim: int = 256
    """Width of the timestep sinusoid and the class embedding that feed the adaLN MLPs (pixart: the sinusoid
    of its timestep MLP, which diffusers fixes at 256)."""
    time_scale: float = 1000.0
    """t in [0, 1] is multiplied by this before the sinusoid. The reference fed raw t, where the highest
    frequency turns one radian over the whole range and the embedding is nearly linear in t; DiT and SD3
    use a 0..1000 scale."""
    time_max_period: float = 10_000.0
    """The timestep sinusoid's frequencies run from 1 down to 1 / time_max_period (DiT's 10,000). The reference's
    own sinusoid spaces them by half - 1 instead of half, which is 10000 ** (half / (half - 1)) here: set by
    `python -m app.import_weights` for its checkpoints (models/reference_layout.py), so they compute what they did."""
    qk_norm: bool = True
    """Per-head RMSNorm on queries and keys (pixart: off, as in PixArt-alpha)."""
    num_classes: int = 1000
    """ccdit: real classes; index num_classes is the null class for guidance."""
    class_embed_std: float = 0.02
    """Standard deviation of the class embeddings at initialisation (class conditioning). The class row is added
    straight to sinusoid(t), whose norm is sqrt(cond_dim / 2) (no timestep MLP in between, unlike DiT): at DiT's
    0.02 a row starts about 35x smaller than the time signal; sqrt(1/2) gives both the same norm."""
    text_dim: int = 2048
    """mmdit / jointdit: width of the frozen text encoder's hidden states."""
    text_len: int = 120
    """mmdit / jointdit: tokens per caption (tokenizer max length)."""
    num_registers: int = 0
    """jointdit / mmpixeldit: learnable register tokens in the joint sequence."""
    text_pad_multiple: int = 1
    """mmdit / jointdit (and the pixel families on them): pad the text-side sequence, mmDiT's keys [null; text]
    or JointDiT's context [registers; context], with masked positions to a multiple of this. Transformer
    Engine's FP8 GEMMs need the rows of a layer's input (batch x sequence) divisible by the recipe's multiple (16, or
    32 for MXFP8: trainer/precision.py); padding each sample's sequence makes that hold for any micro-batch.
    1: no padding."""
    pos_embed: Literal["sincos", "learned"] = "sincos"
    """Absolute positions added to the patch tokens: the fixed 2-D sin-cos table, or a learnable table that
    starts from it and is resized (bicubic) for grids other than base_grid."""
    rope: bool = False
    """2-D RoPE on the image tokens' queries and keys in every self- and joint attention (models/rope.py)."""
    rope_theta: float = 10_000.0
    """RoPE base: the slowest rotation turns once every ~2 pi theta^(..) positions; larger = longer range."""
    pixel_dim: int = 16
    """pixeldit / mmpixeldit: width of each pixel token in the pixel-level stream."""
    pixel_depth: int = 2
    """pixeldit / mmpixeldit: pixel-level (PiT) blocks after the semantic blocks."""
    activation: Literal["silu", "gelu_tanh"] = "silu"
    """The feed-forward's activation. silu everywhere (the reference's choice); pixart may also use gelu_tanh,
    PixArt-alpha's own (its default), or silu, which diffusers calls activation_fn="linear-silu" and which lets
    a Stage-1 ccDiT's MLPs carry over exactly (models/conversion.py: ccdit_to_pixart)."""
    caption_projection: bool = False
    """pixart: PixArt-alpha's caption MLP (Linear text_dim -> dim, GELU-tanh, Linear dim -> dim) before the
    cross-attention, whose keys and values then read dim-wide tokens (diffusers: caption_channels=text_dim)."""
    interpolation_scale: float = 1.0
    """pixart: positions on the base grid step by 1 / interpolation_scale, as diffusers' PatchEmbed divides
    them (PixArt-alpha's 1024 px model uses 2). Other families measure positions in base-grid units only."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into checkpoints (never read by the model)."""

    def __post_init__(self) -> None:
        if self.conditioning is None:
            self.conditioning = default_conditioning(self.family)
        if self.conditioning not in CONDITIONINGS[self.family]:
            raise ValueError(
                f"model.conditioning={self.conditioning!r}: a {self.family} model takes "
                f"{' or '.join(CONDITIONINGS[self.family])}"
            )
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"model.pos_embed must be sincos or learned, got {self.pos_embed!r}")
        if self.rope and (self.dim // self.heads) % 4:
            raise ValueError(f"model.rope needs dim / heads divisible by 4, got {self.dim} / {self.heads}")
        if self.family in ("jointdit", "mmpixeldit") and self.num_registers < 1 and self.conditioning == "text":
            raise ValueError("model.num_registers must be >= 1 for joint attention over captions (a dropped "
                             "caption leaves no other key)")
        if self.text_pad_multiple < 1:
            raise ValueError(f"model.text_pad_multiple must be >= 1 (1: no padding), got {self.text_pad_multiple}")
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if self.input_size % self.patch:
            raise ValueError(f"model.input_size={self.input_size} is not divisible by model.patch={self.patch}")
        if self.base_grid is None:
            self.base_grid = self.input_size // self.patch
        self._check_pixart()

    def _check_pixart(self) -> None:
        """A pixart model is diffusers' PixArtTransformer2DModel, so the options that model cannot express are
        refused (naming the key), and the PixArt-only options are refused elsewhere."""
        if self.family != "pixart":
            own = {"activation": (self.activation, "silu"), "caption_projection": (self.caption_projection, False),
                   "interpolation_scale": (self.interpolation_scale, 1.0)}
            for key, (value, default) in own.items():
                if value != default:
                    raise ValueError(f"model.overrides.{key}={value!r} is a pixart option; a {self.family} model "
                                     f"uses {default!r}")
            return
        fixed = {"qk_norm": (self.qk_norm, False), "rope": (self.rope, False), "pos_embed": (self.pos_embed, "sincos"),
                 "cond_dim": (self.cond_dim, PIXART_TIME_CHANNELS), "mlp_ratio": (self.mlp_ratio, 4.0),
                 "time_scale": (self.time_scale, 1000.0), "time_max_period": (self.time_max_period, 10_000.0)}
        for key, (value, needed) in fixed.items():
            if value != needed:
                raise ValueError(f"model.overrides.{key}={value!r}: a pixart model is diffusers' "
                                 f"PixArtTransformer2DModel, which needs {key}={needed!r}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"model.overrides.activation must be silu or gelu_tanh, got {self.activation!r}")
        if not self.interpolation_scale > 0:
            raise ValueError(f"model.overrides.interpolation_scale must be > 0, got {self.interpolation_scale}")

    @property
    def name(self) -> str:
        return f"{_DISPLAY[self.family]}-{self.size}/{self.patch}"

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


    @property
    def is_pixel_family(self) -> bool:
        return self.family in ("pixeldit", "mmpixeldit")


_DISPLAY = {"ccdit": "ccDiT", "mmdit": "mmDiT", "jointdit": "JointDiT", "pixeldit": "PixelDiT",
            "mmpixeldit": "MMPixelDiT", "pixart": "PixArt"}
