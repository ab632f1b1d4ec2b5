"""Value types shared by config models."""

from typing import Annotated

from pydantic import BeforeValidator

from checkpointer.config.durations import parse_bytes, parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_bytes)]
