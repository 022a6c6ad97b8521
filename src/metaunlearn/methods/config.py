"""The ``method`` section of a stage config: a registered name plus that method's own validated parameters."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from metaunlearn.config import StrictModel, validation_message
from metaunlearn.errors import UserError
from metaunlearn.methods import METHODS, Method, get_method


class MethodSpec(StrictModel):
    """``{name: esd, params: {eta: 3}}``; ``params`` is validated by the method's config and stored resolved."""

    name: str = Field("esd", description=f"one of: {', '.join(METHODS)}")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's hyperparameters")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            get_method(name)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return name

    @model_validator(mode="after")
    def _resolve_params(self) -> MethodSpec:
        config_cls = get_method(self.name).Config
        try:
            resolved = config_cls.model_validate(self.params).model_dump(mode="json")
        except ValidationError as exc:
            raise ValueError(validation_message(exc, f"{self.name} params")) from None
        if resolved != self.params:
            object.__setattr__(self, "params", resolved)  # avoid re-running validation on assignment
        return self

    def build(self) -> Method:
        """An instance of the method with these parameters."""
        cls = get_method(self.name)
        return cls(cls.Config.model_validate(self.params))
