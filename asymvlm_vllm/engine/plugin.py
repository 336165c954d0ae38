"""``vllm serve MODEL --plugin asymvlm``: the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts, and in the API server *before* it
builds its command-line parser. When the command line asks for AsymVLM (``--plugin asymvlm``),
``register`` teaches vLLM's engine arguments two flags:

``--plugin NAME``
    Enable a plugin by name; ``asymvlm`` is the one this package provides.
``--asymvlm-config FILE_OR_PRESET``
    The AsymVLM YAML config (or a bundled preset name, ``asymvlm presets``); default: the
    preset whose ``architectures`` list the model's architecture, else the built-in default.

and turns them into vLLM's own explicit arguments (:func:`asymvlm_engine_args`)::

    --scheduler-cls asymvlm_vllm.engine.scheduler.AsymVLMScheduler
    --worker-cls asymvlm_vllm.engine.worker.AsymVLMWorker          (CPU: AsymVLMCPUWorker)
    --logits-processors asymvlm_vllm.engine.validation:AsymVLMRequestValidator
    --additional-config '{"asymvlm": {...the validated config...}}'
    --middleware asymvlm_vllm.engine.http.StrictRequestOptions       (vllm serve)
    VLLM_USE_V2_MODEL_RUNNER=0                                      (GPU)

Without ``--plugin asymvlm`` on the command line, ``register`` does nothing at all, so an
installed but unused package leaves vLLM exactly as it is. ``register`` may run many times.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the entry point runs in every vLLM process: import the rest only when used
    from ..core.config import AsymVLMConfig

__all__ = [
    "CPU_WORKER", "GPU_WORKER", "PLUGIN_NAME", "SCHEDULER", "asymvlm_engine_args", "register", "resolve_config",
]

PLUGIN_NAME = "asymvlm"
SCHEDULER = "asymvlm_vllm.engine.scheduler.AsymVLMScheduler"
GPU_WORKER = "asymvlm_vllm.engine.worker.AsymVLMWorker"
CPU_WORKER = "asymvlm_vllm.engine.worker.AsymVLMCPUWorker"
VALIDATOR = "asymvlm_vllm.engine.validation:AsymVLMRequestValidator"

_cli_extended = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    if _plugin_requested(sys.argv):
        _extend_cli()


def _plugin_requested(argv: list[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv) and PLUGIN_NAME in argv[i + 1].split(","):
            return True
        if arg.startswith("--plugin=") and PLUGIN_NAME in arg.split("=", 1)[1].split(","):
            return True
    return False


def _model_architectures(model: str | os.PathLike | None) -> list[str]:
    if model is None:
        return []
    path = Path(model) / "config.json"
    try:
        return list(json.loads(path.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def resolve_config(config: str | os.PathLike | "AsymVLMConfig" | dict | None, model: str | os.PathLike | None = None) -> "AsymVLMConfig":
    """The validated config: a file, a preset name, a mapping, or (None) the preset of the
    model's architecture. A learned ranker's scorer file is checked here, at start-up."""
    from ..core.config import AsymVLMConfig, list_presets
    from ..core.scorer_file import load_scorer

    if isinstance(config, AsymVLMConfig):
        resolved = config
    elif isinstance(config, dict):
        resolved = AsymVLMConfig.from_dict(config)
    elif config is not None:
        resolved = AsymVLMConfig.load(config)
    else:
        resolved = AsymVLMConfig()
        architectures = set(_model_architectures(model))
        for name in list_presets():
            preset = AsymVLMConfig.from_preset(name)
            if architectures & set(preset.architectures):
                resolved = preset
                break
    scorer = resolved.vision.scorer
    if scorer is not None:
        scorer = Path(scorer).expanduser().resolve()
        load_scorer(scorer)  # ScorerFileError names the file and what is wrong with it
        resolved = resolved.model_copy(update={"vision": resolved.vision.model_copy(update={"scorer": scorer})})
    return resolved


def _worker_for_platform() -> str:
    from vllm.platforms import current_platform

    return CPU_WORKER if current_platform.is_cpu() else GPU_WORKER


def asymvlm_engine_args(model: str | os.PathLike | None = None,
                        config: str | os.PathLike | "AsymVLMConfig" | dict | None = None,
                        **engine_args: Any) -> dict[str, Any]:
    """vLLM engine arguments that enable AsymVLM, merged into ``engine_args``.

    Examples
    --------
    >>> from vllm import LLM
    >>> llm = LLM(**asymvlm_engine_args("/models/llava-1.5-7b-hf", "llava-1.5"))  # doctest: +SKIP

    Raises
    ------
    ConfigError
        For an invalid config or scorer file, or arguments that contradict AsymVLM.
    """
    from ..core.errors import ConfigError

    resolved = resolve_config(config, model)
    out = dict(engine_args)
    if model is not None:
        out["model"] = str(model)
    for key, ours in (("scheduler_cls", SCHEDULER), ("worker_cls", _worker_for_platform())):
        theirs = out.get(key)
        if theirs not in (None, "auto", ours):
            raise ConfigError(f"AsymVLM sets {key.replace('_', '-')} to {ours}, but {theirs} was given; remove one")
        out[key] = ours
    additional = dict(out.get("additional_config") or {})
    additional["asymvlm"] = resolved.model_dump(mode="json")
    out["additional_config"] = additional
    processors = list(out.get("logits_processors") or [])
    if VALIDATOR not in processors:
        processors.append(VALIDATOR)
    out["logits_processors"] = processors
    _select_v1_runner()
    return out


def _select_v1_runner() -> None:
    from vllm.platforms import current_platform

    from ..core.errors import ConfigError
    from ..envs import V2_RUNNER_VARIABLE, select_v1_model_runner, v2_model_runner_forced

    if current_platform.is_cpu():
        return
    if v2_model_runner_forced():
        raise ConfigError(f"AsymVLM runs on vLLM's V1 model runner; unset {V2_RUNNER_VARIABLE} or set it to 0")
    select_v1_model_runner()


def _extend_cli() -> None:
    global _cli_extended
    if _cli_extended:
        return
    from vllm.engine.arg_utils import EngineArgs

    from ..core.config import list_presets

    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args_with_asymvlm(parser):
        parser = add_cli_args(parser)
        if "--asymvlm-config" not in parser._option_string_actions:
            group = parser.add_argument_group("AsymVLM", "Vision-token pruning (asymvlm-vllm).")
            group.add_argument("--plugin", action="append", default=[], metavar="NAME",
                               help=f"Enable a plugin; '{PLUGIN_NAME}' prunes vision tokens before prefill.")
            group.add_argument("--asymvlm-config", default=None, metavar="FILE_OR_PRESET",
                               help=f"AsymVLM YAML config or preset ({', '.join(list_presets())}); "
                                    "default: the preset for the model's architecture.")
        return parser

    def from_cli_args_with_asymvlm(cls, args):
        _apply_cli_flags(args)
        return from_cli_args(cls, args)

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_asymvlm)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_asymvlm)
    _cli_extended = True


def _apply_cli_flags(args: Any) -> None:
    from ..core.errors import AsymVLMError

    names = [n for value in (getattr(args, "plugin", None) or []) for n in value.split(",") if n]
    unknown = sorted(set(names) - {PLUGIN_NAME})
    if unknown:
        raise SystemExit(f"error: unknown plugin(s) {', '.join(unknown)}; installed: {PLUGIN_NAME}")
    if PLUGIN_NAME not in names:
        if getattr(args, "asymvlm_config", None):
            raise SystemExit("error: --asymvlm-config needs --plugin asymvlm")
        return
    if getattr(args, "_asymvlm_applied", False):
        return
    current = {key: getattr(args, key, None) for key in ("scheduler_cls", "worker_cls", "additional_config", "logits_processors")}
    try:
        engine_args = asymvlm_engine_args(args.model, args.asymvlm_config, **current)
    except AsymVLMError as e:
        raise SystemExit(f"error: AsymVLM cannot start: {e}") from None
    for key, value in engine_args.items():
        if key != "model":
            setattr(args, key, value)
    if hasattr(args, "middleware"):  # the OpenAI server's arguments
        from .http import MIDDLEWARE_QUALNAME

        middleware = list(args.middleware or [])
        if MIDDLEWARE_QUALNAME not in middleware:
            args.middleware = [*middleware, MIDDLEWARE_QUALNAME]
    args._asymvlm_applied = True
