"""Settings: sources and precedence, errors that name the setting, docs that match the code."""

import subprocess
import sys
from pathlib import Path

import pytest

from vproxy.config import load, reference_markdown
from vproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_toml_env_cli(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('listen = "127.0.0.1:1111"\npool_size = 3\ncommand_timeout = 1.5\nbackend = ["127.0.0.1:6379"]\n')
    cfg = load(["--config", str(f)], env={})
    assert (cfg.listen, cfg.pool_size, cfg.command_timeout) == ("127.0.0.1:1111", 3, 1.5)
    cfg = load(["--config", str(f)], env={"VPROXY_POOL_SIZE": "4", "VPROXY_LISTEN": "127.0.0.1:2222"})
    assert (cfg.listen, cfg.pool_size) == ("127.0.0.1:2222", 4)
    cfg = load(["--config", str(f), "--pool-size", "5", "-l", "127.0.0.1:3333"], env={"VPROXY_POOL_SIZE": "4"})
    assert (cfg.listen, cfg.pool_size) == ("127.0.0.1:3333", 5)
    assert cfg.backend == ["127.0.0.1:6379"]


def test_repeatable_backend_flag_and_env_list():
    cfg = load(["-b", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--mode", "replication"], env={})
    assert cfg.backend == ["127.0.0.1:1", "127.0.0.1:2"]
    cfg = load([], env={"VPROXY_BACKEND": "127.0.0.1:1, 127.0.0.1:2"})
    assert cfg.backend == ["127.0.0.1:1", "127.0.0.1:2"]


@pytest.mark.parametrize("argv,env,named", [
    (["--pool-size", "0"], {}, "pool_size"),
    (["--pool-size", "many"], {}, "pool_size"),
    (["--listen", "nowhere"], {}, "listen"),
    (["--backend", "127.0.0.1:99999"], {}, "backend"),
    ([], {"VPROXY_COMMAND_TIMEOUT": "-1"}, "command_timeout"),
    (["--mode", "galaxy"], {}, "mode"),
    (["--mode", "sentinel"], {}, "sentinel"),
])
def test_bad_settings_name_the_setting(argv, env, named):
    with pytest.raises(ConfigError, match=named):
        load(argv, env=env)


def test_unknown_toml_key_is_refused(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text("pool_sise = 3\n")
    with pytest.raises(ConfigError, match="pool_sise"):
        load(["--config", str(f)], env={})


def test_bad_setting_stops_startup_with_message():
    out = subprocess.run([sys.executable, "-m", "vproxy", "--pool-size", "0"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "pool_size" in out.stderr


def test_shipped_config_file_loads():
    cfg = load(["--config", str(ROOT / "conf" / "vproxy.toml")], env={})
    assert cfg.mode == "standalone"


def test_configuration_doc_matches_code():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_markdown() in doc, "docs/configuration.md is stale: run python scripts/gen_docs.py"


def test_embedded_with_a_backend_is_refused():
    """--embedded starts a server of its own: with --backend one of the two would be ignored silently."""
    with pytest.raises(ConfigError, match="'embedded'.*127.0.0.1:6379"):
        load(["--embedded", "--backend", "127.0.0.1:6379"], env={})
    out = subprocess.run([sys.executable, "-m", "vproxy", "--embedded", "-b", "127.0.0.1:6379"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert "setting 'embedded'" in out.stderr and "Traceback" not in out.stderr


def test_deployment_examples_load(tmp_path):
    """conf/deploy: the Kubernetes ConfigMap's vproxy.toml and the systemd unit's flags are settings vproxy takes."""
    import shlex
    import textwrap
    from pathlib import Path

    deploy = Path(__file__).resolve().parent.parent / "conf" / "deploy"
    text = (deploy / "kubernetes.yaml").read_text()
    block = text.split("vproxy.toml: |\n", 1)[1].split("\n---", 1)[0]
    conf = tmp_path / "vproxy.toml"
    conf.write_text(textwrap.dedent(block))
    cfg = load(["-c", str(conf)], env={})
    assert (cfg.admin_listen, cfg.drain_timeout, cfg.log_format) == ("0.0.0.0:9121", 20.0, "json")
    unit = (deploy / "vproxy.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    flags = shlex.split(exec_start.split("=", 1)[1])[1:]
    cfg = load([f if f != "/etc/vproxy/vproxy.toml" else str(conf) for f in flags], env={})
    assert cfg.workers == "auto"


def test_short_flags_are_declared_on_their_settings():
    """A setting's short flag is a field of the setting: the parser and the reference read the same one."""
    from vproxy.config import SETTINGS
    short = {s.name: s.flag for s in SETTINGS if s.flag}
    assert short == {"listen": "-l", "mode": "-m", "backend": "-b", "sentinel": "-s"}
    cfg = load(["-m", "sentinel", "-s", "127.0.0.1:26379", "--master", "m", "-l", ":7000"], env={})
    assert (cfg.mode, cfg.sentinel, cfg.listen) == ("sentinel", ["127.0.0.1:26379"], ":7000")
    assert "| `--listen`, `-l` |" in reference_markdown()
