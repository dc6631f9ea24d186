"""Small building blocks shared by every model family: modulation, MLP, adaLN heads, final layer."""

from collections.abc import Callable

from jaxtyping import Float
from torch import Tensor, nn


def modulate(x: Float[Tensor, "b n d"], shift: Float[Tensor, "b d"], scale: Float[Tensor, "b d"]) -> Tensor:
    """adaLN modulation [peebles2023]: scale around 1 so zero-initialised modulation is the identity."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without affine parameters: adaLN supplies the scale and shift."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> SiLU -> Linear (SiLU as in the reference)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Float[Tensor, "*tokens d"]) -> Float[Tensor, "*tokens d"]:
        return self.fc2(self.act(self.fc1(x)))


def modulate_per_token(x: Float[Tensor, "*n d"], shift: Float[Tensor, "*n d"], scale: Float[Tensor, "*n d"]) -> Tensor:
    """adaLN modulation with a shift and scale of its own for every token (PixelDiT's pixel-wise adaLN).
    Scale around 1, as `modulate`: a zero modulation is the identity."""
    return x * (1 + scale) + shift


def gated_block_forward(
    block: nn.Module,
    x: Float[Tensor, "b n d"],
    mod: Float[Tensor, "b m"],
    cross: Callable[[Tensor], Tensor] | None = None,
    rope: Float[Tensor, "n half"] | None = None,
) -> Float[Tensor, "b n d"]:
    """The gated residual pair of a DiT block: x += g1 * Attn(modulate(LN x)); x += g2 * MLP(modulate(LN x)).

    `mod` holds (shift1, scale1, gate1, shift2, scale2, gate2). An mmDiT block passes `cross`, an
    un-gated residual (cross-attention) run between the two, as in PixArt-alpha. `rope`: 2-D RoPE angles
    for the self-attention (models/rope.py), or None.
    """
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
    x = x + gate1[:, None] * block.attn(modulate(block.norm1(x), shift1, scale1), rope)
    if cross is not None:
        x = x + cross(x)
    return x + gate2[:, None] * block.mlp(modulate(block.norm2(x), shift2, scale2))


class AdaLNModulation(nn.Module):
    """Conditioning vector -> `chunks` modulation vectors of width `dim`: Linear -> SiLU -> Linear.

    The two-layer form (W2 SiLU(W1 c + b1) + b2) is what lets reparameterize.py bake a fixed class
    embedding e into b1 exactly: W1 (t + e) + b1 = W1 t + (W1 e + b1).
    """

    def __init__(self, cond_dim: int, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.fc1 = nn.Linear(cond_dim, dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(dim, chunks * dim)

    def forward(self, c: Float[Tensor, "b c"]) -> Float[Tensor, "b m"]:
        return self.fc2(self.act(self.fc1(c)))

    def zero_init(self) -> None:
        """adaLN-Zero: every modulation starts at 0, so gates are closed and scales are 1."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)


class FinalLayer(nn.Module):
    """LayerNorm -> modulate (shift, scale from the conditioning) -> Linear to patch*patch*channels."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.adaLN = AdaLNModulation(cond_dim, dim, chunks=2)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Float[Tensor, "b n d"], c: Float[Tensor, "b c"]) -> Float[Tensor, "b n o"]:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

    def zero_init(self) -> None:
        self.adaLN.zero_init()
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)


def init_linears_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear, DiT's base initialisation [peebles2023].

    Model constructors call this first, then apply their zero inits on top (order matters: the
    reference ran a generic init after the zero inits and silently undid them).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_patch_embed(conv: nn.Conv2d) -> None:
    """Initialise the patch conv like a Linear over the flattened patch [peebles2023]."""
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(conv.bias)

