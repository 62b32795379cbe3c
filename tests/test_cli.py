"""The command table: every command's help renders, and `lorakit --help` imports no heavy library."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorakit.cli import COMMANDS, main


# command groups show their examples on their subcommands
HELP_ARGS = [[c] if c != "bigram" else [c, "sample"] for c in COMMANDS]


@pytest.mark.parametrize("args", HELP_ARGS, ids=" ".join)
def test_every_command_has_help_with_an_example(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"lorakit {' '.join(args)}" in out and "example" in out


def test_top_level_help_lists_commands_without_importing_torch():
    code = ("import sys; from lorakit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in COMMANDS)
    assert out.strip().endswith("False")


def test_public_names_are_the_functions_whatever_was_imported_first():
    code = ("import lorakit.io, lorakit.train, lorakit\n"
            "print(all(callable(getattr(lorakit, n)) or isinstance(getattr(lorakit, n), type) for n in lorakit.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


@pytest.mark.parametrize("args, message", [
    (["--adapter", "nowhere/at/all"], "is not a directory"),
    (["--adapter", "bad name=."], "is not allowed"),
    (["--adapter-dir", "no/such/dir"], "is not a directory"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
])
def test_serve_bad_arguments_end_in_one_line(args, message, capsys):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("lorakit serve: error:")


def test_serve_refuses_a_port_in_use(capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.splitlines()) == 1


def test_serve_flags_reach_every_config_field(tmp_path, monkeypatch):
    """`lorakit serve`'s flags come from ServeConfig's fields: each value given lands in the config."""
    import dataclasses

    from lorakit.serve import app

    built = []
    monkeypatch.setattr(app, "serve", built.append)
    monkeypatch.setenv("LORAKIT_API_KEY", "from-env")
    (tmp_path / "a").mkdir()
    given = {"base": "some/base", "adapter_dir": tmp_path, "host": "::1", "port": 8123, "max_batch": 3,
             "max_waiting": 5, "max_tokens": 7, "max_body_bytes": 4096, "max_adapters": 2, "dtype": "fp32",
             "quantize": "nf4", "served_model_name": "m"}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in given.items()]
    assert main(["serve", "--adapter", f"legal={tmp_path / 'a'}", *args]) == 0
    config = built[0]
    assert {k: getattr(config, k) for k in given} == given
    assert config.adapters == {"legal": str(tmp_path / "a")} and config.api_key == "from-env"
    assert {f.name for f in dataclasses.fields(config)} == {*given, "adapters", "api_key"}  # none forgotten
    assert main(["serve", "--api-key", "k"]) == 0 and built[1].api_key == "k"


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


@pytest.mark.parametrize("user_value", [None, "0"])
def test_commands_back_big_tensors_with_huge_pages_unless_the_user_says_not(user_value):
    """`main` turns on torch's transparent huge pages for big CPU tensors before any command imports torch;
    a THP_MEM_ALLOC_ENABLE of the user's stands."""
    code = ("import os, re, sys; from lorakit.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' in sys.modules\n"
            "import torch; x = torch.ones(64 << 18)  # 64 MB, touched\n"
            "huge = int(re.search(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps_rollup').read()).group(1))\n"
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], huge)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_value
    if not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("no /proc/self/smaps_rollup (not Linux)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         stdin=subprocess.DEVNULL).stdout.strip().splitlines()[-1].split()  # after the help
    assert out[0] == (user_value or "1")
    mode = _thp_mode()
    if user_value is None and mode in ("madvise", "always"):
        assert int(out[1]) > 0, f"no huge pages for a 64 MB tensor (THP {mode})"
    if user_value == "0" and mode == "madvise":
        assert int(out[1]) == 0
