"""What a checkpoint says of its workload (`spec` in the manifest's metadata): how to rebuild
the tree on any host, and the options it runs with there.

A workload that moves (migrate, failover, `restore NAME` on another host) is registered on its
new host from its checkpoint alone: without its options there it ran unscheduled, so the next
failure lost everything since the move, and with the default retention and restore policy.
So the options travel in the spec, as one list shared with the registry (`options_json`): what
workloads.json keeps of a workload's options, the manifest carries. In an encrypted repository
the manifest is sealed, so the options are as authentic as the checkpoint itself.

A spec is read as hostile input (anyone with the repository's key writes manifests, and in a
repository in clear anyone who can write the bucket): every field through the config's own
pydantic models. A malformed tree (kind, command, container) makes that checkpoint
unrestorable with a message that says so; malformed options only lose the options (the tree
restores with the defaults, as before options travelled, and the log says why).
Keys a newer version adds are ignored, so older hosts keep reading its checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from checkpointer.config import CriuOptions, WorkloadOptions
from checkpointer.containers import ContainerError, check_container_name
from checkpointer.engine.workload import Workload, WorkloadKind
from checkpointer.errors import RestoreFailed

MAX_ENV = 1024  # variables; a whole environment is far below the kernel's ARG_MAX anyway
# Characters of a validation problem quoted in a message: the keys in it are the writer's.
MAX_PROBLEM = 400


def options_json(w: Workload) -> dict[str, Any]:
    """A workload's options as JSON: the registry's record and the spec's `options` alike."""
    return {
        "env": dict(w.env),
        "every": w.every,
        "cron": w.cron,
        "jitter": w.jitter,
        "criu": w.criu.model_dump(),
        # The retention in force, the top-level one included: the new host's own top-level
        # retention may differ, and the workload keeps what it had.
        "retention": w.retention.model_dump(exclude_none=True),
        "restore": w.restore.model_dump(),
        "drill": w.drill.model_dump(),
    }


def describe(w: Workload, log_fifo: str | None) -> dict[str, Any]:
    """The spec written with each checkpoint of `w`. `criu` stays at the top level too: hosts
    of versions before options travelled read it from there. `log_fifo`: this host's FIFO for
    the tree's output, whose path is in the image (restoring.py hands its own in its place)."""
    return {
        "kind": str(w.kind),
        "command": w.command,
        "cwd": w.cwd,
        "criu": w.criu.model_dump(),
        "log_fifo": log_fifo,
        "container": w.container,
        "options": options_json(w),
    }


class CarriedOptions(WorkloadOptions):
    """The `options` of a spec: WorkloadOptions, validated as in the config, plus `env`."""

    model_config = ConfigDict(extra="ignore")  # a newer host's options: the known ones apply

    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        # What execve would refuse (NUL) or misread ('=' in a name) fails here, with the
        # checkpoint named, not in a cold start on the new host.
        if len(v) > MAX_ENV:
            raise ValueError(f"more than {MAX_ENV} variables")
        for key, value in v.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"{key!r}: not a variable name, or a value with a NUL byte")
        return v

    def workload_options(self) -> WorkloadOptions:
        return WorkloadOptions.model_validate(
            self.model_dump(include=set(WorkloadOptions.model_fields))
        )


class _Tree(BaseModel):
    """The tree's part of a spec: what a restore needs whatever the options."""

    model_config = ConfigDict(extra="ignore")

    kind: WorkloadKind = WorkloadKind.ADOPTED  # manifests before specs: adopted trees
    command: list[str] | None = Field(None, min_length=1)
    cwd: str | None = None
    container: str | None = None
    log_fifo: str | None = None
    criu: CriuOptions = Field(default_factory=CriuOptions)
    options: Any = None  # read on its own (`read`): bad options must not lose the tree

    @field_validator("criu", mode="before")
    @classmethod
    def _no_criu(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("log_fifo", mode="before")
    @classmethod
    def _fifo(cls, v: Any) -> str | None:
        # Only a hint (restoring.py falls back to this host's own FIFO path): a bad one is
        # dropped rather than failing the checkpoint. CRIU's --inherit-fd takes it in one line.
        ok = isinstance(v, str) and v.startswith("/") and "\n" not in v and "\0" not in v
        return v if ok else None

    @model_validator(mode="after")
    def _container(self) -> _Tree:
        if not self.kind.is_container:
            self.container = None
        else:
            try:
                check_container_name(self.container)  # type: ignore[arg-type]
            except ContainerError as e:
                raise ValueError(str(e)) from e
        return self


@dataclass(frozen=True)
class Spec:
    """A spec read back. `options` is what to register the workload with: the carried options
    (`carried`), else the defaults with the spec's CRIU options, as before options travelled;
    `problem` says why carried options were not used when they were there but malformed."""

    kind: WorkloadKind
    command: list[str] | None
    cwd: str | None
    container: str | None
    log_fifo: str | None
    options: WorkloadOptions
    env: dict[str, str]
    carried: bool
    problem: str | None = None


def read(metadata: dict[str, Any], name: str, checkpoint_id: str) -> Spec:
    """The spec of checkpoint `checkpoint_id` of `name`, from its manifest's metadata. Raises
    RestoreFailed (with what to do) when the tree's part is malformed; never anything else."""
    where = f"checkpoint {checkpoint_id} of {name}"
    raw = metadata.get("spec")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        _refuse(name, where, "its workload spec is not a mapping")
    try:
        tree = _Tree.model_validate(raw)
    except ValidationError as e:
        _refuse(name, where, f"its workload spec is malformed: {_problems(e)}")
    defaults = WorkloadOptions(criu=tree.criu)
    options, env, problem = defaults, {}, None
    if tree.options is not None:
        try:
            if not isinstance(tree.options, dict):
                raise TypeError("not a mapping")
            carried = CarriedOptions.model_validate(tree.options)
        except ValidationError as e:
            problem = _problems(e)
        except TypeError as e:
            problem = str(e)
        else:
            options, env = carried.workload_options(), dict(carried.env)
    return Spec(
        kind=tree.kind,
        command=tree.command,
        cwd=tree.cwd,
        container=tree.container,
        log_fifo=tree.log_fifo,
        options=options,
        env=env,
        carried=tree.options is not None and problem is None,
        problem=f"the options in {where} are malformed ({problem})" if problem else None,
    )


def _refuse(name: str, where: str, why: str) -> NoReturn:
    raise RestoreFailed(
        f"{where} is not restored: {why}; restore another one with `checkpointer restore "
        f"{name} --checkpoint ID` (`checkpointer list {name}` shows them)"
    )


def _problems(e: ValidationError) -> str:
    """One line: each problem's key path and what is wrong (never the value: it may be a
    secret of the environment), cut short."""
    text = "; ".join(
        ".".join(str(part) for part in err["loc"]) + ": " + err["msg"].removeprefix("Value error, ")
        for err in e.errors()
    )
    return text if len(text) <= MAX_PROBLEM else text[: MAX_PROBLEM - 3] + "..."
