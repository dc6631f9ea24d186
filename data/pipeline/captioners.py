"""Captioning backends, one interface: `caption(images, metas) -> [(long, short), ...]`, one pair per image.

    VLLMCaptioner             a vision-language model in this process (vLLM; GPU machines only)
    OpenAICompatibleCaptioner any OpenAI-compatible chat server, e.g. `vllm serve Qwen/Qwen3-VL-2B-Instruct`
    TarCaptioner              the captions the input tar already holds

The VLM backends ask two questions per image, the long and the short instruction of prompts/*.txt:
"render-spec" captions of visible, physical attributes only. Sampling follows the reference (temperature
0.7, top_p 0.85, top_k 30, at most 120 new tokens). A backend returns "" where it has no caption; the
pipeline drops such records from text datasets and counts them.
"""

import base64
import io
import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

PROMPTS_DIR = Path(__file__).parent / "prompts"
RETRYABLE_HTTP = (408, 409, 425, 429)
"""Besides every 5xx: statuses that mean "try again", not "your request is wrong"."""


class CaptionerError(RuntimeError):
    """A captioning backend failed for good (after its retries); the message says where and why."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 0.85
    top_k: int = 30
    max_tokens: int = 120
    seed: int | None = None


@dataclass(frozen=True)
class Prompts:
    long: str
    short: str

    @classmethod
    def load(cls, long_path: Path | str | None = None, short_path: Path | str | None = None) -> "Prompts":
        long_path = Path(long_path or PROMPTS_DIR / "long_caption.txt")
        short_path = Path(short_path or PROMPTS_DIR / "short_caption.txt")
        return cls(long_path.read_text(encoding="utf-8").strip(), short_path.read_text(encoding="utf-8").strip())


class Captioner(Protocol):
    needs_images: bool
    """False when captions come from the metadata: the pipeline then skips making the captioner's crop."""

    def caption(self, images: list[Image.Image | None], metas: list[dict[str, Any]]) -> list[tuple[str, str]]: ...
    def describe(self) -> dict[str, Any]: ...


def clean_caption(text: str) -> str:
    """One line, no surrounding quotes: VLMs like to wrap a phrase in quotes or end with a newline."""
    text = " ".join(text.split())
    return text.strip("\"'` ").strip()


def derive_short(long: str, max_words: int = 12) -> str:
    """A short caption from a long one: its first clause (up to the first , ; : or sentence end), at most
    `max_words` words. Used when a tar has no `short_caption`."""
    first = re.split(r"[,;:]|\.(?:\s|$)", long.strip(), maxsplit=1)[0]
    return " ".join(first.split()[:max_words]).rstrip(".")


class TarCaptioner:
    """Captions already in the tar: the long one from `.txt` (else the json `caption`), the short one from the
    json `short_caption` (else `derive_short` of the long one)."""

    needs_images = False

    def __init__(self, short: bool = True):
        self.short = short

    def caption(self, images: list[Image.Image | None], metas: list[dict[str, Any]]) -> list[tuple[str, str]]:
        pairs = []
        for meta in metas:
            record = meta.get("json") or {}
            long = clean_caption(meta.get("txt") or str(record.get("caption") or ""))
            short = clean_caption(str(record.get("short_caption") or "")) or derive_short(long)
            pairs.append((long, short if self.short else ""))
        return pairs

    def describe(self) -> dict[str, Any]:
        return dict(backend="tar", short_fallback="first clause of the long caption" if self.short else None)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "--captioner vllm needs vLLM, which is not installed here. Run `pip install vllm` (the `caption` extra) on "
            "a CUDA machine, in an environment of its own (vLLM pins its torch), or use --captioner openai with a "
            "running `vllm serve MODEL`, or --captioner tar when the tars carry captions."
        ) from err
    return vllm


class VLLMCaptioner:
    """A VLM (Qwen3-VL-2B/8B-Instruct style) run by vLLM in this process; batched chat with PIL images."""

    needs_images = True

    def __init__(
        self,
        model: str,
        sampling: SamplingConfig = SamplingConfig(),
        prompts: Prompts | None = None,
        short: bool = True,
        tensor_parallel_size: int = 1,
        max_model_len: int = 768,
        gpu_memory_utilization: float = 0.70,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        vllm = _import_vllm()
        self.model, self.sampling, self.short = model, sampling, short
        self.prompts = prompts or Prompts.load()
        kwargs = dict(
            model=model,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            limit_mm_per_prompt={"image": 1},
        )
        # llm_kwargs wins: e.g. mm_processor_kwargs to bound a processor's image tokens to max_model_len.
        self.llm = vllm.LLM(**(kwargs | (llm_kwargs or {})))
        self.params = vllm.SamplingParams(**asdict(sampling))

    def _conversation(self, image: Image.Image, prompt: str) -> list[dict[str, Any]]:
        content = [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def caption(self, images: list[Image.Image | None], metas: list[dict[str, Any]]) -> list[tuple[str, str]]:
        prompts = [self.prompts.long, self.prompts.short] if self.short else [self.prompts.long]
        # One chat call for the whole batch, both questions interleaved: vLLM batches them on the GPU.
        conversations = [self._conversation(im, p) for im in images for p in prompts]
        outputs = self.llm.chat(conversations, self.params, use_tqdm=False)
        texts = [clean_caption(out.outputs[0].text) if out.outputs else "" for out in outputs]
        k = len(prompts)
        return [(texts[i * k], texts[i * k + 1] if self.short else "") for i in range(len(images))]

    def describe(self) -> dict[str, Any]:
        return dict(
            backend="vllm", model=self.model, sampling=asdict(self.sampling), prompts=asdict(self.prompts)
        )


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless; level 1 because this runs per image
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAICompatibleCaptioner:
    """POSTs `{base_url}/chat/completions` (base_url such as http://localhost:8000/v1), one request per image
    and prompt, `max_workers` in flight so the server can batch them. top_k is sent as a plain body field,
    which vLLM's server accepts (the OpenAI client would need it in `extra_body`). The API key, if any, is
    read from the environment variable `api_key_env` and sent as a bearer token."""

    needs_images = True

    def __init__(
        self,
        base_url: str,
        model: str,
        sampling: SamplingConfig = SamplingConfig(),
        prompts: Prompts | None = None,
        short: bool = True,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_workers: int = 16,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.sampling, self.short = model, sampling, short
        self.prompts = prompts or Prompts.load()
        self.api_key, self.timeout, self.max_retries = api_key, timeout, max_retries
        self.backoff, self.max_workers = backoff, max_workers

    def request_body(self, prompt: str, data_url: str) -> dict[str, Any]:
        content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": prompt}]
        body = dict(model=self.model, messages=[{"role": "user", "content": content}], n=1)
        body |= {k: v for k, v in asdict(self.sampling).items() if v is not None}
        return body

    def _post(self, body: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode("utf-8", errors="replace")
                error = f"HTTP {err.code}: {detail}"
                if err.code < 500 and err.code not in RETRYABLE_HTTP:
                    raise CaptionerError(f"POST {self.url} was refused ({error}); check --vlm-model") from err
                continue
            except (OSError, json.JSONDecodeError) as err:  # connection refused or reset, timeout, bad body
                error = f"{type(err).__name__}: {err}"
                continue
            try:
                return clean_caption(reply["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError) as err:
                raise CaptionerError(f"POST {self.url}: not a chat completion response: {str(reply)[:300]}") from err
        raise CaptionerError(
            f"POST {self.url} failed after {self.max_retries + 1} attempts (last: {error}); "
            "is the server up (`vllm serve MODEL`) and --openai-base-url right?"
        )

    def caption(self, images: list[Image.Image | None], metas: list[dict[str, Any]]) -> list[tuple[str, str]]:
        prompts = [self.prompts.long, self.prompts.short] if self.short else [self.prompts.long]
        bodies = [self.request_body(p, url) for url in map(png_data_url, images) for p in prompts]
        pool = ThreadPoolExecutor(max(1, min(self.max_workers, len(bodies))))
        try:
            texts = list(pool.map(self._post, bodies))
        finally:
            # On a failure, do not wait for (or retry) the requests still queued.
            pool.shutdown(wait=False, cancel_futures=True)
        k = len(prompts)
        return [(texts[i * k], texts[i * k + 1] if self.short else "") for i in range(len(images))]

    def describe(self) -> dict[str, Any]:
        return dict(
            backend="openai", model=self.model, sampling=asdict(self.sampling), prompts=asdict(self.prompts)
        )
