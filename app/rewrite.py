"""Prompt rewriting for the Gradio app: a user's prompt retold in the caption style the model was trained on.

    rewriter = PromptRewriter("http://localhost:8000/v1", "Qwen/Qwen3-VL-2B-Instruct")
    rewriter.rewrite("red ball, top left")  # -> "A large red circle sits in the top left of the frame ..."

A text-to-image model follows prompts best when they read like its training captions. Those were written by a
VLM to the instructions in data/pipeline/prompts/ (long_caption.txt, short_caption.txt), so the rewriter hands
the same VLM server (`vllm serve MODEL`, or any OpenAI-compatible chat endpoint) the same instructions and
asks it to turn the user's words into such a caption, text only. The HTTP client, its retries and its
sampling settings are the captioner's (data/pipeline/captioners.py), not a second implementation.
"""

from dataclasses import asdict
from typing import Literal

from data.pipeline.captioners import CaptionerError, OpenAICompatibleCaptioner, Prompts, SamplingConfig

SYSTEM = (
    "You rewrite prompts for a text-to-image model. It was trained on image captions that a captioner wrote "
    "while looking at each image, following the instructions between the lines below. Rewrite the user's prompt "
    "into one caption that follows those instructions as if you were looking at the image the user asks for. "
    "Keep every object, colour, size, count, position and background the prompt names; add only plausible "
    "visible detail that does not contradict it. Answer with the caption only."
)


class RewriteError(RuntimeError):
    """The rewriting server could not be reached or refused the request; the message names the app's flags."""


class PromptRewriter(OpenAICompatibleCaptioner):
    """A text-only use of the captioner's OpenAI-compatible client: one chat request per prompt, a system
    message with the caption instructions and the user's prompt. It subclasses the captioner to reuse its
    `_post` (headers, retries with backoff, the response checks) and its sampling defaults.

    Fewer retries and a shorter timeout than the sharding pipeline's: someone is waiting in the browser."""

    def __init__(
        self,
        base_url: str,
        model: str,
        style: Literal["long", "short"] = "long",
        api_key: str | None = None,
        max_words: int | None = None,
        sampling: SamplingConfig | None = None,
        timeout: float = 60.0,
        max_retries: int = 1,
    ):
        if style not in ("long", "short"):
            raise ValueError(f"--rewrite-style must be 'long' or 'short', got {style!r}")
        super().__init__(
            base_url, model, sampling or SamplingConfig(), Prompts.load(), short=False, api_key=api_key,
            timeout=timeout, max_retries=max_retries, backoff=0.5, max_workers=1,
        )
        self.style, self.max_words = style, max_words

    @property
    def instructions(self) -> str:
        """The captioner's instruction for this style, plus a length budget so the caption fits the tokenizer."""
        text = self.prompts.long if self.style == "long" else self.prompts.short
        if self.max_words:
            text += f"\nUse at most {self.max_words} words."
        return text

    def rewrite_body(self, prompt: str) -> dict:
        """The chat-completions request for one prompt, with the captioner's sampling fields."""
        system = f"{SYSTEM}\n---\n{self.instructions}\n---"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        body = dict(model=self.model, messages=messages, n=1)
        return body | {k: v for k, v in asdict(self.sampling).items() if v is not None}

    def rewrite(self, prompt: str) -> str:
        """The prompt as a training-style caption (one line, quotes stripped); RewriteError if the server fails
        or answers with nothing."""
        try:
            text = self._post(self.rewrite_body(prompt))
        except CaptionerError as err:
            # The captioner's messages name the sharding pipeline's flags; here the same settings are these.
            message = str(err).replace("--vlm-model", "--rewrite-model").replace("--openai-base-url",
                                                                                 "--rewrite-endpoint")
            raise RewriteError(f"prompt rewriting failed: {message}") from err
        if not text:
            raise RewriteError(f"prompt rewriting failed: {self.url} returned an empty caption (--rewrite-model "
                               f"{self.model})")
        return text

    def describe(self) -> dict:
        return dict(backend="openai", url=self.url, model=self.model, style=self.style, max_words=self.max_words)
