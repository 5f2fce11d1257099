"""The web config file: node_exporter's shape, checked whole at start-up, one-line errors."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from gputel.settings import SettingsError, load_settings
from gputel.telemetry.webconfig import WebConfigError, load
from selfsigned import make_cert

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A folder with a self-signed server.crt/server.key (also usable as a client CA)."""
    folder = tmp_path / "tls"
    folder.mkdir()
    make_cert(folder)
    return folder


def write(folder: Path, text: str) -> Path:
    path = folder / "web.yml"
    path.write_text(text)
    path.chmod(0o640)  # it may hold password hashes: never readable by others
    return path


def test_full_config_with_paths_relative_to_the_file(certs: Path) -> None:
    path = write(
        certs,
        "tls_server_config:\n"
        "  cert_file: server.crt\n"
        "  key_file: server.key\n"
        "  client_ca_file: server.crt\n"
        "  min_version: TLS13\n"
        "basic_auth_users:\n"
        f"  alice: '{HASH}'\n",
    )
    config = load(path)
    assert config.ssl_context is not None
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    # A client CA without an auth type means "require and verify", as in exporter-toolkit.
    assert config.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert config.users == {"alice": HASH.encode()}


def test_empty_file_and_auth_only(tmp_path: Path) -> None:
    empty = load(write(tmp_path, ""))
    assert empty.ssl_context is None and not empty.users
    auth_only = load(write(tmp_path, f"basic_auth_users:\n  bob: '{HASH}'\n"))
    assert auth_only.ssl_context is None and set(auth_only.users) == {"bob"}


BAD = [
    ("tls_server_config: [1, 2]\n", "tls_server_config: expected a mapping"),
    ("tls_server_config:\n  key_file: server.key\n", "tls_server_config.cert_file: missing"),
    ("tls_server_config:\n  cert_file: server.crt\n", "tls_server_config.key_file: missing"),
    (
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
        "tls_server_config.cert_file: ",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.crt\n",
        "tls_server_config.cert_file: cannot load",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  min_version: TLS99\n",
        "tls_server_config.min_version: 'TLS99'",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n",
        "tls_server_config.client_ca_file: required",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAnyClientCert\n",
        "tls_server_config.client_auth_type: RequireAnyClientCert",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        "tls_server_config.cipher_suites: not supported",
    ),
    ("http_server_config:\n  http2: false\n", "http_server_config: not supported"),
    ("tls_config:\n  cert_file: x\n", "tls_config: unknown key"),
    ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice: expected a bcrypt hash"),
    (f"basic_auth_users:\n  'a:b': '{HASH}'\n", "basic_auth_users.a:b: a user name"),
    ("basic_auth_users: [\n", "line "),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_files_name_the_file_and_the_key(certs: Path, text: str, message: str) -> None:
    path = write(certs, text)
    with pytest.raises(WebConfigError) as info:
        load(path)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: ")
    assert message in line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="No such file"):
        load(tmp_path / "absent.yml")


def test_setting_is_empty_by_default_and_checked_when_set(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings({}).web_config == ""
    good = write(certs, f"basic_auth_users:\n  alice: '{HASH}'\n")
    monkeypatch.chdir(
        certs
    )  # a relative setting is taken from the working directory, made absolute
    assert load_settings({"GPUTEL_WEB_CONFIG": "web.yml"}).web_config == str(good)
    bad = write(certs, "basic_auth_users:\n  alice: plaintext\n")
    with pytest.raises(SettingsError, match="GPUTEL_WEB_CONFIG") as info:
        load_settings({"GPUTEL_WEB_CONFIG": str(bad)})
    assert "basic_auth_users.alice" in str(info.value)


def test_agent_with_a_bad_web_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "tls_server_config:\n  cert_file: missing.crt\n  key_file: k\n")
    env = {
        **os.environ,
        "GPUTEL_BACKEND": "none",
        "GPUTEL_LOG_DIR": str(tmp_path / "log"),
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_WEB_CONFIG": str(bad),
    }
    result = subprocess.run(
        [sys.executable, "-m", "gputel", "agent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "GPUTEL_WEB_CONFIG" in lines[0] and "tls_server_config.cert_file" in lines[0]
    assert not (tmp_path / "log").exists() and not (tmp_path / "run").exists()


def test_the_documented_example_loads_and_its_hash_matches(certs: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    (certs / "node.crt").write_bytes((certs / "server.crt").read_bytes())
    (certs / "node.key").write_bytes((certs / "server.key").read_bytes())
    (certs / "node.key").chmod(0o600)
    config = load(write(certs, example))
    assert config.ssl_context is not None
    assert bcrypt.checkpw(b"example", config.users["prometheus"])


def test_password_hashes_or_a_key_readable_by_others_are_refused(certs: Path) -> None:
    users = "basic_auth_users:\n  prom: $2b$04$" + "a" * 53 + "\n"
    path = write(certs, users)
    path.chmod(0o644)
    with pytest.raises(WebConfigError, match="readable by others"):
        load(path)
    path.chmod(0o640)
    assert load(path).users
    (certs / "server.key").chmod(0o644)
    tls = write(certs, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    with pytest.raises(WebConfigError, match=r"key_file.*readable by others"):
        load(tls)
