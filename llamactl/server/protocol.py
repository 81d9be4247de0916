"""Request bodies (pydantic). Responses are plain dicts built in the routes.

Unknown fields are ignored (OpenAI clients send many); types and ranges are checked, and the validation
error handler turns failures into a plain 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS_HARD = 32_768
MAX_TEXT = 32_768


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenOptions(_Body):
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_HARD)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool | None = None
    # Benchmark extensions (vLLM's names): generate at least min_tokens / exactly max_tokens.
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_HARD)
    ignore_eos: bool = False


class InferRequest(GenOptions):
    image: str = Field(description="base64 image; a data: URL prefix is accepted")
    question: str = Field("Describe this image in detail.", min_length=1, max_length=MAX_TEXT)


class BatchInferRequest(GenOptions):
    images: list[str] = Field(min_length=1, max_length=256)
    questions: list[str] | str = "Describe this image in detail."


class JobRequest(InferRequest):
    pass


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ImageURL(_Body):
    url: str = Field(min_length=1)
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_HARD)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_HARD)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_HARD)
    ignore_eos: bool = False
