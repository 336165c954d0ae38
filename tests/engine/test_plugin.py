"""The ``vllm.general_plugins`` entry point (``asymvlm_vllm.engine.plugin``).

* Without an engine: ``register()`` leaves vLLM untouched unless the command line says
  ``--plugin asymvlm``; with it, the flags parse and become vLLM's explicit engine arguments;
  every mistake stops with a message naming the problem.
* With an engine (in-process, CPU, tiny LLaVA): installed but not enabled, vLLM runs its own
  scheduler and model runner and generates exactly what it generates when the entry point is
  not loaded at all; a scorer that does not fit the model stops start-up.

``register()`` patches ``EngineArgs.add_cli_args`` / ``from_cli_args`` (and
importing ``asymvlm_vllm.engine.validation`` wraps ``RequestState.make_request_output`` and the OpenAI
request models' ``to_sampling_params``) for the
whole process; the ``cli`` fixture saves and restores all of it, so that later in-process
engines in this pytest run see plain vLLM.

Note: ``tests/engine/conftest.py`` marks every test under ``tests/engine`` ``slow``, including
the engine-free ones here (each still takes well under a second once vLLM is imported).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from .helpers import (REPO_ROOT, chat_messages, engine_image, free_llm, generated_tokens, greedy_params, make_llm,
                      model_runner, scheduler, subprocess_env)

SHIM_ENTRY_POINT = "asymvlm_test_cpu_shim"  # tests/engine/cpu_shim/*.dist-info/entry_points.txt
LLAVA_ARCH = "LlavaForConditionalGeneration"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llava(engine_models) -> Path:
    return engine_models("llava")


@pytest.fixture(scope="module")
def llava_hidden_size(llava) -> int:
    return int(json.loads((llava / "config.json").read_text())["text_config"]["hidden_size"])


@pytest.fixture
def cli(monkeypatch):
    """The plugin module; ``sys.argv`` is a plain ``vllm serve`` line, and the process-wide
    patches that ``register()`` and the plugin's flags make are undone afterwards."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.v1.engine.output_processor import RequestState

    from asymvlm_vllm.engine import metrics, plugin

    saved_engine_args = {name: EngineArgs.__dict__[name] for name in ("add_cli_args", "from_cli_args")}
    saved_hook = RequestState.__dict__["make_request_output"]
    saved_hook_installed = metrics._hook_installed
    request_models = (ChatCompletionRequest, CompletionRequest, ResponsesRequest)  # validation._REQUEST_MODELS
    saved_validators = [model.__dict__["to_sampling_params"] for model in request_models]
    validation = sys.modules.get("asymvlm_vllm.engine.validation")
    saved_validators_installed = getattr(validation, "_installed", False)
    monkeypatch.setattr(plugin, "_cli_extended", False)
    monkeypatch.setattr(sys, "argv", ["vllm", "serve", "MODEL"])
    try:
        yield plugin
    finally:
        for name, value in saved_engine_args.items():
            setattr(EngineArgs, name, value)
        RequestState.make_request_output = saved_hook
        metrics._hook_installed = saved_hook_installed
        for model, value in zip(request_models, saved_validators):
            model.to_sampling_params = value
        validation = sys.modules.get("asymvlm_vllm.engine.validation")
        if validation is not None:
            validation._installed = saved_validators_installed


def _parser():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm serve"))


def _enable(monkeypatch, plugin, model) -> None:
    """What ``vllm serve MODEL --plugin asymvlm`` does before vLLM builds its parser."""
    monkeypatch.setattr(sys, "argv", ["vllm", "serve", str(model), "--plugin", "asymvlm"])
    plugin.register()


def _engine_args(model, *flags: str):
    from vllm.engine.arg_utils import EngineArgs

    args = _parser().parse_args(["--model", str(model), *flags])
    return EngineArgs.from_cli_args(args)


def _exit_message(model, *flags: str) -> str:
    with pytest.raises(SystemExit) as info:
        _engine_args(model, *flags)
    return str(info.value.code)


def _write_scorer(path: Path, weight: torch.Tensor, hidden_size: int) -> Path:
    """A scorer file written without :func:`save_scorer`'s checks (it refuses bad weights)."""
    from safetensors.torch import save_file

    from asymvlm_vllm.core.scorer_file import ScorerMetadata

    metadata = ScorerMetadata(architecture=LLAVA_ARCH, hidden_size=hidden_size)
    save_file({"weight": weight.contiguous()}, str(path), metadata={"asymvlm": metadata.model_dump_json()})
    return path


def _learned_config(tmp_path: Path, scorer: Path) -> Path:
    path = tmp_path / "learned.yaml"
    path.write_text(f"vision:\n  ranker: learned\n  scorer: {scorer}\n")
    return path


# ----------------------------------------------------------------------------- (a) without an engine


def test_importing_the_engine_package_and_plugin_does_not_import_vllm():
    code = ("import sys, asymvlm_vllm.engine, asymvlm_vllm.engine.plugin; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "asymvlm"]
    assert ep.value == "asymvlm_vllm.engine.plugin:register"


def test_register_without_plugin_flag_changes_nothing(cli, llava):
    from vllm.engine.arg_utils import EngineArgs

    before = {name: EngineArgs.__dict__[name] for name in ("add_cli_args", "from_cli_args")}
    for argv in (["vllm", "serve", str(llava)], ["vllm", "serve", str(llava), "--plugin", "other"],
                 ["vllm", "serve", str(llava), "--asymvlm-config", "llava-1.5"]):
        sys.argv = argv
        cli.register()
        cli.register()
    assert {name: EngineArgs.__dict__[name] for name in before} == before
    assert EngineArgs.add_cli_args is before["add_cli_args"].__func__
    # ...so vLLM's own parser rejects the plugin's flags exactly as plain vLLM does.
    for flags in (["--plugin", "asymvlm"], ["--asymvlm-config", "llava-1.5"]):
        with pytest.raises(SystemExit) as info:
            _parser().parse_args(["--model", str(llava), *flags])
        assert info.value.code == 2
    args = _parser().parse_args(["--model", str(llava)])
    assert not hasattr(args, "plugin") and not hasattr(args, "asymvlm_config")
    assert EngineArgs.from_cli_args(args).scheduler_cls is None


def test_argparse_error_names_the_flag_without_plugin(cli, llava, capsys):
    sys.argv = ["vllm", "serve", str(llava), "--asymvlm-config", "llava-1.5"]
    cli.register()
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", str(llava), "--asymvlm-config", "llava-1.5"])
    assert "unrecognized arguments: --asymvlm-config" in capsys.readouterr().err


def test_register_is_reentrant_and_flags_become_vllm_engine_args(cli, llava, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from asymvlm_vllm.core.config import AsymVLMConfig

    original = EngineArgs.__dict__["add_cli_args"]
    _enable(monkeypatch, cli, llava)
    patched = EngineArgs.__dict__["add_cli_args"], EngineArgs.__dict__["from_cli_args"]
    assert patched[0] is not original
    cli.register()
    cli.register()
    assert (EngineArgs.__dict__["add_cli_args"], EngineArgs.__dict__["from_cli_args"]) == patched

    engine_args = _engine_args(llava, "--plugin", "asymvlm", "--asymvlm-config", "llava-1.5")
    assert engine_args.scheduler_cls == cli.SCHEDULER == "asymvlm_vllm.engine.scheduler.AsymVLMScheduler"
    assert engine_args.worker_cls == cli.CPU_WORKER == "asymvlm_vllm.engine.worker.AsymVLMCPUWorker"
    assert engine_args.logits_processors == ["asymvlm_vllm.engine.validation:AsymVLMRequestValidator"]
    config = AsymVLMConfig.from_dict(engine_args.additional_config["asymvlm"])
    assert config == AsymVLMConfig.from_preset("llava-1.5")

    # No --asymvlm-config: the preset whose architectures list the model's.
    engine_args = _engine_args(llava, "--plugin=asymvlm")
    assert AsymVLMConfig.from_dict(engine_args.additional_config["asymvlm"]).architectures == [LLAVA_ARCH]

    # Explicit vLLM arguments that agree with the plugin, and unrelated additional_config, are kept.
    engine_args = _engine_args(llava, "--plugin", "asymvlm", "--scheduler-cls", cli.SCHEDULER,
                               "--additional-config", '{"other": 1}')
    assert engine_args.scheduler_cls == cli.SCHEDULER
    assert engine_args.additional_config["other"] == 1 and "asymvlm" in engine_args.additional_config


def test_explicit_flags_without_the_plugin_give_the_same_engine_args(cli, llava, monkeypatch):
    """The README's "equivalent explicit flags", parsed by plain vLLM's parser."""
    from asymvlm_vllm.core.config import AsymVLMConfig
    from asymvlm_vllm.engine.settings import asymvlm_config_from

    plain = _engine_args(llava, "--scheduler-cls", cli.SCHEDULER, "--worker-cls", cli.CPU_WORKER,
                         "--logits-processors", cli.VALIDATOR,
                         "--additional-config", '{"asymvlm": {"config": "llava-1.5"}}')
    _enable(monkeypatch, cli, llava)
    plugged = _engine_args(llava, "--plugin", "asymvlm", "--asymvlm-config", "llava-1.5")
    for key in ("scheduler_cls", "worker_cls", "logits_processors"):
        assert getattr(plain, key) == getattr(plugged, key), key

    class _Config:  # what the engine reads: VllmConfig.additional_config
        def __init__(self, additional_config):
            self.additional_config = additional_config

    preset = AsymVLMConfig.from_preset("llava-1.5")
    assert asymvlm_config_from(_Config(plain.additional_config)) == preset
    assert asymvlm_config_from(_Config(plugged.additional_config)) == preset


@pytest.mark.parametrize("flags, expected", [
    (["--plugin", "asymvlm,nonesuch"], "unknown plugin(s) nonesuch"),
    (["--asymvlm-config", "llava-1.5"], "--asymvlm-config needs --plugin asymvlm"),
    (["--plugin", "asymvlm", "--asymvlm-config", "no-such-preset"], "no-such-preset"),
    (["--plugin", "asymvlm", "--scheduler-cls", "my.Scheduler"], "scheduler-cls"),
    (["--plugin", "asymvlm", "--worker-cls", "my.Worker"], "worker-cls"),
])
def test_mistakes_stop_with_a_message(cli, llava, monkeypatch, flags, expected):
    _enable(monkeypatch, cli, llava)
    message = _exit_message(llava, *flags)
    assert expected in message
    assert message.startswith("error: ")


def test_missing_and_invalid_config_files_stop_with_a_message(cli, llava, monkeypatch, tmp_path):
    _enable(monkeypatch, cli, llava)
    missing = tmp_path / "missing.yaml"
    message = _exit_message(llava, "--plugin", "asymvlm", "--asymvlm-config", str(missing))
    assert str(missing) in message and "No such file" in message

    broken = tmp_path / "broken.yaml"
    broken.write_text("vision: [unclosed\n")
    message = _exit_message(llava, "--plugin", "asymvlm", "--asymvlm-config", str(broken))
    assert str(broken) in message and "not valid YAML" in message

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("vision:\n  min_keep: 0\n")
    message = _exit_message(llava, "--plugin", "asymvlm", "--asymvlm-config", str(wrong))
    assert "vision.min_keep" in message


@pytest.mark.parametrize("problem", ["nan", "shape", "missing"])
def test_bad_scorer_file_stops_with_a_message(cli, llava, llava_hidden_size, monkeypatch, tmp_path, problem):
    _enable(monkeypatch, cli, llava)
    scorer = tmp_path / "scorer.safetensors"
    if problem == "nan":
        weight = torch.ones(llava_hidden_size)
        weight[3] = math.nan
        _write_scorer(scorer, weight, llava_hidden_size)
        expected = "non-finite"
    elif problem == "shape":
        _write_scorer(scorer, torch.ones(llava_hidden_size + 1), llava_hidden_size)
        expected = f"shape ({llava_hidden_size},)"
    else:
        expected = "does not exist"
    message = _exit_message(llava, "--plugin", "asymvlm", "--asymvlm-config", str(_learned_config(tmp_path, scorer)))
    assert str(scorer) in message and expected in message


# ----------------------------------------------------------------------------- (b) installed, not enabled

_PLAIN_RUN = textwrap.dedent("""
    import json, sys
    from tests.engine.helpers import chat_messages, engine_image, generated_tokens, greedy_params, make_llm, scheduler, model_runner
    llm = make_llm(sys.argv[1])
    out = llm.chat([chat_messages(engine_image(0), "What is in the image?")], greedy_params(8))
    print("RESULT " + json.dumps({
        "tokens": generated_tokens(out),
        "scheduler": type(scheduler(llm)).__module__ + "." + type(scheduler(llm)).__qualname__,
        "runner": type(model_runner(llm)).__module__ + "." + type(model_runner(llm)).__qualname__,
        "asymvlm_loaded": sorted(m for m in sys.modules if m.startswith("asymvlm_vllm.engine")),
    }))
""")


def test_installed_but_not_enabled_is_plain_vllm(llava):
    import vllm.plugins
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    llm = make_llm(llava)
    try:
        assert vllm.plugins.plugins_loaded  # the asymvlm entry point was called (and did nothing)
        assert type(scheduler(llm)) is Scheduler
        assert type(model_runner(llm)) is CPUModelRunner
        assert "asymvlm" not in (llm.llm_engine.vllm_config.additional_config or {})
        assert EngineArgs.add_cli_args.__module__ == "vllm.engine.arg_utils"
        tokens = generated_tokens(llm.chat([chat_messages(engine_image(0), "What is in the image?")], greedy_params(8)))
    finally:
        free_llm(llm)

    # The same engine in a fresh process where vLLM loads only the test shim's entry point
    # (VLLM_PLUGINS is an allow-list, read when plugins are first loaded in a process).
    env = subprocess_env()
    env["VLLM_PLUGINS"] = SHIM_ENTRY_POINT
    out = subprocess.run([sys.executable, "-c", _PLAIN_RUN, str(llava)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    plain = json.loads(line.removeprefix("RESULT "))
    assert plain["asymvlm_loaded"] == []  # the entry point really was not loaded there
    assert plain["scheduler"] == "vllm.v1.core.sched.scheduler.Scheduler"
    assert plain["runner"] == "vllm.v1.worker.cpu_model_runner.CPUModelRunner"
    assert tokens == plain["tokens"]
    assert len(tokens[0]) == 8


# ----------------------------------------------------------------------------- (c) scorer vs model


def test_scorer_for_another_hidden_size_stops_engine_start_up(llava, llava_hidden_size, tmp_path):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from asymvlm_vllm.core.scorer_file import ScorerMetadata, save_scorer
    from asymvlm_vllm.engine.plugin import asymvlm_engine_args

    other = llava_hidden_size * 2
    scorer = save_scorer(tmp_path / "other-model.safetensors", torch.full((other,), 1.0),
                         ScorerMetadata(architecture=LLAVA_ARCH, hidden_size=other))
    engine_args = asymvlm_engine_args(llava, {"vision": {"ranker": "learned", "scorer": str(scorer)}})
    engine_args.pop("model")
    llm = None
    try:
        with pytest.raises(Exception) as info:
            llm = make_llm(llava, **engine_args)
    finally:
        if llm is not None:
            free_llm(llm)
        cleanup_dist_env_and_memory()
    chain, error = [], info.value
    while error is not None:  # vLLM may wrap the runner's error
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    message = "\n".join(chain)
    assert str(scorer) in message, message
    assert str(other) in message and str(llava_hidden_size) in message, message
