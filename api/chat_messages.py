"""Chat messages, checked per role (the OpenAI chat API's message types).

`role` picks the message type (a discriminated union, so the OpenAPI schema states the rule
too): system, developer and user messages need `content`, a string or a list of text parts;
an assistant message may carry none (a turn that only called tools, in OpenAI's API). Roles this
server cannot render (`tool`, `function`) are refused by name instead of reaching the chat
template, whose own error would be less clear.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.unicode_check import valid_unicode


class _Model(BaseModel):
    # Strict: no bool-as-int, no number-as-string; unknown keys are ignored as OpenAI does.
    model_config = ConfigDict(extra="ignore", strict=True)

    _unicode = field_validator("*")(valid_unicode)


class TextPart(_Model):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class _Message(_Model):
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content: Any = getattr(self, "content", None)
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # Chat templates know "system"; OpenAI's "developer" is the same instruction slot.
        role = "system" if self.role == "developer" else self.role  # type: ignore[attr-defined]
        return {"role": role, "content": content or ""}


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None


ChatMessage = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage,
                        Field(discriminator="role")]
ROLES = ("system", "developer", "user", "assistant")
