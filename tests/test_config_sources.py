"""Settings from flags, SPLITSERVE_* variables and --config files (launch/config_sources.py):
precedence flag > env > file > default, values parsed by the flag's own type and choices,
one-line errors naming the key, --print-config, and what `up` forwards to its children."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitserve.launch import config_sources
from splitserve.launch.child_settings import child_settings
from splitserve.launch.cli import command_actions, resolve_args


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("use_flag", "use_env", "use_file", "expected", "origin"),
    [
        (True, True, True, 11, "flag"),
        (False, True, True, 22, "env SPLITSERVE_MAX_NUM_SEQS"),
        (False, False, True, 33, "file"),
        # Not given: None, the device's default once the engine config is built.
        (False, False, False, None, "default"),
    ],
)
def test_precedence_flag_env_file_default(
    tmp_path: Path, use_flag: bool, use_env: bool, use_file: bool, expected: int, origin: str
) -> None:
    argv = ["decode", "--model", "m", "--config", write(tmp_path, "max_num_seqs: 33\n")]
    argv += ["--max-num-seqs", "11"] if use_flag else []
    if not use_file:
        argv = argv[:3] + argv[5:]
    env = {"SPLITSERVE_MAX_NUM_SEQS": "22"} if use_env else {}
    resolved = resolve_args(argv, env)
    assert resolved.args.max_num_seqs == expected
    assert str(resolved.origins["max-num-seqs"]).startswith(origin)


def test_file_and_env_values_parse_as_the_flag_does(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: /models/x\nnum-blocks: 64\nno_prefix_caching: true\ndtype: float32\n"
        "prefill-timeout-s: 3\nserved-model-name: null\n",
    )
    env = {"SPLITSERVE_NO_CHUNKED_PREFILL": "yes", "SPLITSERVE_DRAIN_TIMEOUT_S": "2.5"}
    args = resolve_args(["decode", "--config", path], env).args
    assert args.model == "/models/x" and args.num_blocks == 64 and args.dtype == "float32"
    assert args.no_prefix_caching is True and args.no_chunked_prefill is True
    assert args.prefill_timeout_s == 3.0 and isinstance(args.prefill_timeout_s, float)
    assert args.drain_timeout_s == 2.5 and args.served_model_name is None
    off = resolve_args(["decode", "--model", "m"], {"SPLITSERVE_NO_PREFIX_CACHING": "false"})
    assert off.args.no_prefix_caching is False


def test_repeatable_flags_and_nested_commands(tmp_path: Path) -> None:
    path = write(tmp_path, "cors-origin: [https://a.example, https://b.example]\n")
    args = resolve_args(["router", "--redis", "redis://h:1", "--config", path], {}).args
    assert args.cors_origin == ["https://a.example", "https://b.example"]
    env = {"SPLITSERVE_CORS_ORIGIN": "[x, y]", "SPLITSERVE_REDIS": "redis://e:2"}
    args = resolve_args(["router"], env).args
    assert args.cors_origin == ["x", "y"] and args.redis == "redis://e:2"
    # `bench run`: the sub-action's flags too; --no-stream: true is --stream false.
    bench_file = write(tmp_path, "no-stream: true\n")
    env = {"SPLITSERVE_URL": "http://h:9"}
    resolved = resolve_args(["bench", "run", "--config", bench_file], env)
    assert resolved.args.url == "http://h:9" and resolved.args.stream is False
    text = config_sources.render_yaml(resolved, "bench run")
    assert f"stream: false  # file {bench_file}" in text and "no-stream" not in text


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("max-num-sqes: 4\n", {}, "'max-num-sqes' in "),
        ("", {"SPLITSERVE_MAX_NUM_SQES": "4"}, "SPLITSERVE_MAX_NUM_SQES: unknown setting"),
        ("max-num-seqs: many\n", {}, "--max-num-seqs from file"),
        ("max-num-seqs: 2.5\n", {}, "not a whole number"),
        ("dtype: float99\n", {}, "'float99' is not one of auto"),
        ("no-prefix-caching: maybe\n", {}, "expected true or false"),
        ("num-blocks: [1, 2]\n", {}, "expected one value"),
        ("config: other.yaml\n", {}, "cannot be set in a config file"),
        ("- a list\n", {}, "expected a mapping"),
    ],
)
def test_bad_settings_are_one_line_errors(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    argv = ["decode", "--model", "m", "--config", write(tmp_path, text)]
    with pytest.raises(ValueError, match=message) as info:
        resolve_args(argv, env)
    assert "\n" not in str(info.value)


def test_required_flag_and_other_commands_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--model is required: give it as a flag, as SPLIT"):
        resolve_args(["decode"], {})
    # A router key in a node's file (one file for a deployment) is left for the router.
    path = write(tmp_path, "routing-policy: least_load\nmodel: m\n")
    resolved = resolve_args(["decode", "--config", path], {"SPLITSERVE_CACHE": "/c"})
    assert resolved.others["routing-policy"][0] == "least_load"


def test_print_config_round_trips_and_hides_secrets(tmp_path: Path) -> None:
    env = {"SPLITSERVE_API_KEY": "s3cret", "SPLITSERVE_ROUTING_POLICY": "round_robin"}
    path = write(tmp_path, "tokenizer-threads: 3\nstrict-fields: true\n")
    argv = ["router", "--redis", "redis://h:1", "--config", path, "--port", "0"]
    resolved = resolve_args(argv, env)
    text = config_sources.render_yaml(resolved, "router")
    assert 'api-key: "***"  # env SPLITSERVE_API_KEY' in text and "s3cret" not in text
    assert f"tokenizer-threads: 3  # file {path}" in text and "port: 0  # flag" in text
    settings = yaml.safe_load(text)
    del settings["api-key"]
    again = resolve_args(["router", "--config", write(tmp_path, yaml.safe_dump(settings))], {})
    for name in settings:
        dest = resolved.dests[name]
        assert getattr(again.args, dest) == getattr(resolved.args, dest), name


def test_up_forwards_node_and_router_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "stream-idle-timeout-s: 30\nnum-blocks: 96\nport: 9100\n")
    env = {"SPLITSERVE_MAX_NUM_SEQS": "4", "SPLITSERVE_CACHE": "/c"}
    argv = ["up", "--config", path, "--log-format", "json"]
    resolved = resolve_args(argv, env)
    assert resolved.args.port == 9100  # up's own: the router's port, never a node's
    forwarded = child_settings(resolved, command_actions, env)
    assert set(forwarded.node_args) == {
        "--log-level=info",
        "--log-format=json",
        "--num-blocks=96",
        "--max-num-seqs=4",
    }
    assert "--stream-idle-timeout-s=30.0" in forwarded.router_args
    assert "--log-format=json" in forwarded.router_args
    assert not any(a.startswith("--port") for a in forwarded.node_args + forwarded.router_args)
    assert forwarded.drop_env == ("SPLITSERVE_MAX_NUM_SEQS",)


def test_print_config_command_line(tmp_path: Path) -> None:
    """The real command (the router: no torch to import): exit 0 and the effective YAML,
    the same setting given three ways resolved flag > env > file; a bad value: exit 2 and
    one line."""
    path = write(tmp_path, "tokenizer-threads: 3\nmax_body_bytes: 1000\nport: 7000\n")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSERVE_")}
    env = {**inherited, "SPLITSERVE_MAX_BODY_BYTES": "2000", "SPLITSERVE_PORT": "7100"}
    command = [sys.executable, "-m", "splitserve.launch.cli", "router", "--redis", "redis://h"]
    done = subprocess.run(
        [*command, "--config", path, "--port", "7200", "--print-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    settings = yaml.safe_load(done.stdout)
    assert settings["port"] == 7200 and settings["max-body-bytes"] == 2000
    assert settings["tokenizer-threads"] == 3
    assert "max-body-bytes: 2000  # env SPLITSERVE_MAX_BODY_BYTES" in done.stdout
    assert f"tokenizer-threads: 3  # file {path}" in done.stdout
    bad = subprocess.run(
        [*command, "--print-config"],
        env={**env, "SPLITSERVE_TOKENIZER_THREADS": "many"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "splitserve router: error: --tokenizer-threads from env SPLITSERVE_TOKENIZER_THREADS: "
        "invalid value 'many': invalid literal for int() with base 10: 'many'"
    ]


def test_children_of_up_do_not_inherit_settings_variables(monkeypatch) -> None:
    """ManagedProcess(drop_env=...): the child's environment lacks them, restarts too."""
    from splitserve.launch.processes import ManagedProcess

    monkeypatch.setenv("SPLITSERVE_PORT", "9000")
    code = "import os; print('listening on', os.environ.get('SPLITSERVE_PORT', 'unset'))"
    child = ManagedProcess("child", [sys.executable, "-c", code], drop_env=["SPLITSERVE_PORT"])
    assert child.start(timeout_s=60).address == "unset"
    again = child.fresh_copy()
    assert again.start(timeout_s=60).address == "unset"
    child.stop()
    again.stop()
