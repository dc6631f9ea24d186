"""Small randomly initialised stand-ins for the networks the metrics read images through, with the interfaces the
real ones have (nothing downloads in the tests): a feature net as evaluation/features.py describes it, and a
transformers CLIP with a processor, as torchmetrics' CLIPScore takes them."""

import torch
from torch import nn


class TinyFeatures(nn.Module):
    """uint8 [b, 3, h, w] -> pool [b, 12], spatial [b, 3 * 4 * 4], logits [b, 10], like InceptionFeatures."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 12, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(12, 10, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3, "the interface takes uint8 NCHW images"
        x = torch.nn.functional.interpolate(images.float() / 127.5 - 1, size=(16, 16), mode="bilinear")
        h = torch.tanh(self.conv(x))  # b 12 8 8
        spatial = torch.nn.functional.adaptive_avg_pool2d(h[:, :3], 4).flatten(1)
        pool = h.mean(dim=(2, 3))
        return dict(pool=pool, spatial=spatial, logits=self.head(pool) * 3)


def tiny_clip():
    """(model, processor) factory: a 1-layer CLIP of width 32 over 32 px images, with the bundled MiniLM tokenizer
    (CLIP's own tokenizer files are not on this machine; any tokenizer the processor accepts exercises the path)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor
    from transformers import CLIPImageProcessorPil as ImageProcessor

    from core.text_encoder import default_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, projection_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)
