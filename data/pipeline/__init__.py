"""Shard images into latent shards: caption, tokenize, VAE-encode (CLI: data/make_shards.py).

    inputs       every source as units of work: WebDataset tars, an image folder with side-by-side captions, a
                 Hugging Face datasets dataset (saved, local files or Hub; streamed or not), parquet files
    sources      tars (URL template or glob, read whole or refused), rank split, decoding, size and flat-image
                 filters, crops
    captioners   VLLMCaptioner, OpenAICompatibleCaptioner, TarCaptioner: caption(images, metas) -> [(long, short)]
    stage_check  what a training stage's config will accept (--for-stage), before any work
    (the tokenizer and the VAEs are core/tokenizer.py and core/vae.py: the samplers use them too)
    run          PipelineConfig, run_rank (resumable, one unit of work per input unit), finalize (manifest.json)

Import the submodules directly; this file imports nothing so that `import data.pipeline` stays cheap
(diffusers and transformers load only when an encoder is built).
"""
