"""Small building blocks shared by the model families: modulation, MLP, adaLN heads, final layer, initialisation,
and the caption side of cross-attention."""

from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from models.attention import pad_sequence, padded_length
from models.embeddings import token_grid, unpatchify


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
    """LayerNorm -> modulate (shift, scale from the conditioning) -> Linear to each patch's pixels -> the image."""

    def __init__(self, dim: int, cond_dim: int, patch: int, channels: int):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.norm = layer_norm(dim)
        self.adaLN = AdaLNModulation(cond_dim, dim, chunks=2)
        self.linear = nn.Linear(dim, patch**2 * channels)

    def forward(
        self, x: Float[Tensor, "b n d"], c: Float[Tensor, "b c"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        """The image of `size` (H, W) that the tokens x, one a patch, stand for."""
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        patches = self.linear(modulate(self.norm(x), shift, scale))  # b n (p p o)
        return unpatchify(patches, self.patch, self.channels, *token_grid(size, self.patch))

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


def init_dit_weights(model: nn.Module, patch_conv: nn.Conv2d) -> None:
    """DiT's base initialisation [peebles2023]: xavier for every nn.Linear of `model`, then its patch conv. A
    family's `initialize_weights` starts with this and then makes its own draws and zero inits."""
    init_linears_xavier(model)
    init_patch_embed(patch_conv)


# ---- the caption side of cross-attention (mmDiT, PixArt) ------------------------------------------------------
# A family turns a caption into the keys its blocks' cross-attention reads (`caption_keys`: the mmDiT prepends its
# learned null token, PixArt runs its caption MLP), padded with masked rows to a multiple of text_pad_multiple (FP8
# GEMMs). Each block projects its own keys and values from them, inside the block, so that activation
# checkpointing and FSDP see that projection as the block's. A sampler calls the model at every ODE step on the
# same captions, and those projections from the encoder's width (2048 for T5Gemma) are a sizeable share of a
# forward: `prepare_captions` computes every block's once, and the model then takes `text_kv=` and the padded
# `text_mask=` in place of `text=` and `text_mask=`.

PREPARED_KEYS = ("text_kv", "text_mask")
"""The keywords a prepared caption is passed by (`DiffusionTransformer.prepared_keys`)."""

CaptionKeys = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""A family's caption_keys: (text, text_mask) -> (keys, their mask), padded."""


def pad_to_multiple(
    tokens: Float[Tensor, "b l e"], mask: Bool[Tensor, "b l"], multiple: int
) -> tuple[Float[Tensor, "b m e"], Bool[Tensor, "b m"]]:
    """`tokens` and `mask` with masked zero rows appended up to a multiple of `multiple` rows."""
    return pad_sequence(tokens, mask, padded_length(tokens.shape[1], multiple))


def prepare_captions(
    blocks: Iterable[nn.Module], keys: Float[Tensor, "b m e"], mask: Bool[Tensor, "b m"]
) -> dict[str, Tensor]:
    """Every block's keys and values of the caption keys, stacked: `text_kv` [b, depth, 2, heads, m, head_dim]."""
    kv = torch.stack([torch.stack(block.cross_attn.context_kv(keys), dim=1) for block in blocks], dim=1)
    return dict(text_kv=kv, text_mask=mask)


def block_captions(
    caption_keys: CaptionKeys,
    depth: int,
    text: Float[Tensor, "b l e"] | None,
    text_mask: Bool[Tensor, "b _"],
    text_kv: Float[Tensor, "b depth 2 h m e2"] | None,
) -> tuple[Float[Tensor, "b m c"] | None, Bool[Tensor, "b m"], Sequence[Tensor | None]]:
    """What the cross-attention of each of `depth` blocks reads: (the caption keys, their mask, each block's
    prepared keys and values). From a caption: its keys, and no prepared ones (each block projects its own);
    prepared: no keys, the mask as prepared, and block i's share of `text_kv`."""
    if text_kv is not None:
        return None, text_mask.bool(), text_kv.unbind(1)
    keys, mask = caption_keys(text, text_mask)
    return keys, mask, [None] * depth
