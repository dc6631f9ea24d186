"""Shard a WebDataset of images into latent shards: caption, tokenize, VAE-encode (CLI: data/make_shards.py).

    sources     input tars (URL template or glob), rank split, decoding, size and flat-image filters, crops
    captioners  VLLMCaptioner, OpenAICompatibleCaptioner, TarCaptioner: caption(images, metas) -> [(long, short)]
    (the tokenizer and the VAEs are core/tokenizer.py and core/vae.py: the samplers use them too)
    run         PipelineConfig, run_rank (resumable, one unit of work per input tar), finalize (manifest.json)

Import the submodules directly; this file imports nothing so that `import data.pipeline` stays cheap
(diffusers and transformers load only when an encoder is built).
"""
