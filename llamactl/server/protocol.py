"""Request bodies (pydantic). Response shapes, for the OpenAPI document, are in ``openapi_docs``.

Unknown fields are ignored (OpenAI clients send many); types are strict (``0`` is not a boolean, ``"5"`` not
an integer), ranges and lengths are checked, and the validation error handler turns failures into a plain 422
naming the field. Every rule here is also in the OpenAPI document, so generated clients know them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

MAX_TOKENS_HARD = 32_768
MAX_TEXT = 32_768
MAX_ITEMS = 256  # images per /batch_infer, messages per chat request



def _integral(value: object) -> object:
    """JSON Schema counts 5.0 as an integer, so it is taken as 5; strings and booleans still are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Bounds go before the validator: after it (or on an ``X | None`` field) the schema gets raw "ge"/"le" keys.
TokenLimit = Annotated[int, Field(ge=1, le=MAX_TOKENS_HARD), BeforeValidator(_integral)]
MinTokens = Annotated[int, Field(ge=0, le=MAX_TOKENS_HARD), BeforeValidator(_integral)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
ImageData = Annotated[
    str,
    Field(
        min_length=1,
        description="A base64-encoded JPEG, PNG, GIF, WebP, BMP or TIFF image; a data: URL prefix "
        "(data:image/png;base64,...) is accepted. Bytes that do not decode to an image are refused with 400, "
        "an unsupported format with 415, an image over the server's size limits with 413.",
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/*"},
    ),
]
Question = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
DEFAULT_QUESTION = "Describe this image in detail."


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class GenOptions(_Body):
    max_tokens: TokenLimit | None = Field(
        None,
        description="Tokens to generate at most; above the server's own limit (LLAMACTL_GEN_MAX_NEW_TOKENS) "
        "the request is refused with 400. Default: that limit.",
    )
    temperature: Temperature | None = None
    top_p: TopP | None = None
    do_sample: bool | None = None
    # Benchmark extensions (vLLM's names): generate at least min_tokens / exactly max_tokens.
    min_tokens: MinTokens = 0
    ignore_eos: bool = False


class InferRequest(GenOptions):
    image: ImageData
    question: Question = DEFAULT_QUESTION


class BatchInferRequest(GenOptions):
    images: list[ImageData] = Field(min_length=1, max_length=MAX_ITEMS)
    questions: Annotated[list[Question], Field(min_length=1, max_length=MAX_ITEMS)] | Question = Field(
        DEFAULT_QUESTION,
        description="One question for every image, or a list with one question per image "
        "(a list of another length is refused with 422).",
    )


class JobRequest(InferRequest):
    pass


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=MAX_TEXT)


def _data_url(url: str) -> str:
    if not url.startswith("data:"):
        raise ValueError("must be a data: URL (base64); this server does not fetch remote URLs")
    return url


class ImageURL(_Body):
    url: Annotated[str, AfterValidator(_data_url)] = Field(
        json_schema_extra={"pattern": "^data:"},
        description="A data: URL of a base64-encoded image (data:image/png;base64,...). Remote URLs are refused.",
    )
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class ChatMessage(_Body):
    """One message; only a user message may carry an image (at most one per request), else 400.

    One model for every role, not one per role: a role-split union lets a fuzzer's "invalid" role land on another
    branch's valid value (schemathesis sent {"role": "user"} as a violation of the system branch).
    """

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description='"developer" is read as "system". The Llama 3.2 Vision template refuses a system message '
        "together with an image (400)."
    )
    content: Text | Annotated[list[ContentPart], Field(min_length=1)]


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    max_tokens: TokenLimit | None = Field(
        None, description="As max_completion_tokens (which wins when both are given)."
    )
    max_completion_tokens: TokenLimit | None = Field(
        None,
        description="Tokens to generate at most; above the server's own limit (LLAMACTL_GEN_MAX_NEW_TOKENS) "
        "the request is refused with 400. Default: that limit.",
    )
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=1), BeforeValidator(_integral)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
