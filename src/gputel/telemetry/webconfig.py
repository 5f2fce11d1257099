"""The web config file for ``/metrics``: TLS and basic auth in the Prometheus exporter convention.

The file has the YAML shape of node_exporter's ``--web.config.file`` (prometheus/exporter-toolkit),
so one file and one habit serve every exporter on a node::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: clients.crt                    # optional
      min_version: TLS12                             # optional (the default)
    basic_auth_users:
      prometheus: $2b$10$...         # bcrypt hash

Everything is checked when it is loaded (the certificate and key are loaded into the TLS context,
every hash is checked for shape), so a bad file stops gputel at start-up with one line naming the
file and the key, instead of failing the first scrape. Keys of the convention that gputel does not
implement are refused by name rather than silently ignored: a silently dropped ``cipher_suites``
would be a weaker server than the operator asked for.
"""

from __future__ import annotations

import contextlib
import ssl
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``min_version`` / ``max_version`` words, as exporter-toolkit spells them.
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
#: ``client_auth_type`` words gputel can honour with OpenSSL, and the verify mode each means.
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
#: Go accepts a client certificate without verifying it; OpenSSL through Python cannot.
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
_TOP_KEYS = {"tls_server_config", "basic_auth_users"}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
}
#: Keys of the convention that gputel refuses by name (see the module docstring).
_UNSUPPORTED = {
    "http_server_config",
    "tls_server_config.cert",
    "tls_server_config.key",
    "tls_server_config.cipher_suites",
    "tls_server_config.curve_preferences",
    "tls_server_config.client_allowed_sans",
}
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


class WebConfigError(ValueError):
    """A bad web config. ``str()`` is one line: the file, the key, and what is wrong."""


@dataclass(frozen=True)
class WebConfig:
    """A loaded web config: the TLS context (None = plain HTTP) and the users (empty = no auth)."""

    path: Path
    ssl_context: ssl.SSLContext | None = None
    #: user name -> bcrypt hash
    users: Mapping[str, bytes] = field(default_factory=dict)


def load(path: str | Path) -> WebConfig:
    """Read, check and load ``path``; raises WebConfigError with one line on any problem."""
    path = Path(path).expanduser().absolute()

    def fail(key: str, reason: str) -> WebConfigError:
        where = f"{path}: {key}" if key else str(path)
        return WebConfigError(f"{where}: {reason}")

    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise fail("", getattr(exc, "strerror", None) or str(exc)) from None
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise fail("", f"{line}{problem}") from None
    if doc is None:
        return WebConfig(path)  # an empty file is valid: plain HTTP, no auth
    top = _mapping(doc, "", fail)
    _check_keys(top, _TOP_KEYS, "", fail)
    context = None
    if top.get("tls_server_config") is not None:
        context = _tls_context(
            path.parent, _mapping(top["tls_server_config"], "tls_server_config", fail), fail
        )
    users = _users(top.get("basic_auth_users"), fail)
    if users and mode & stat.S_IROTH:
        raise fail(
            "basic_auth_users",
            f"the file holds password hashes and is readable by others (mode "
            f"{stat.S_IMODE(mode):04o}): chmod o-r {path}",
        )
    return WebConfig(path, context, users)


FailFn = Callable[[str, str], WebConfigError]


def _mapping(value: object, key: str, fail: FailFn) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise fail(key, "expected a mapping of names to values")
    return value


def _check_keys(doc: Mapping[str, Any], allowed: set[str], prefix: str, fail: FailFn) -> None:
    for key in doc:
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in _UNSUPPORTED:
            raise fail(dotted, "not supported by gputel")
        if key not in allowed:
            raise fail(dotted, f"unknown key (expected one of: {', '.join(sorted(allowed))})")


def _string(doc: Mapping[str, Any], key: str, prefix: str, fail: FailFn) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise fail(f"{prefix}.{key}", "expected a non-empty string")
    return value


def _tls_context(base: Path, tls: Mapping[str, Any], fail: FailFn) -> ssl.SSLContext:
    prefix = "tls_server_config"
    _check_keys(tls, _TLS_KEYS, prefix, fail)
    cert = _string(tls, "cert_file", prefix, fail)
    key = _string(tls, "key_file", prefix, fail)
    if cert is None:
        raise fail(f"{prefix}.cert_file", "missing (the server certificate, PEM)")
    if key is None:
        raise fail(f"{prefix}.key_file", "missing (the server's private key, PEM)")
    cert_path, key_path = base / Path(cert).expanduser(), base / Path(key).expanduser()
    for name, file in (("cert_file", cert_path), ("key_file", key_path)):
        if not file.is_file():
            raise fail(f"{prefix}.{name}", f"{file}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise fail(
            f"{prefix}.cert_file", f"cannot load {cert_path} with {key_path}: {exc}"
        ) from None
    # Checked once it loads as a key: a file that is no key at all is reported as such.
    with contextlib.suppress(OSError):
        key_mode = key_path.stat().st_mode
        if key_mode & stat.S_IROTH:
            raise fail(
                f"{prefix}.key_file",
                f"{key_path}: the private key is readable by others (mode "
                f"{stat.S_IMODE(key_mode):04o}): chmod o-r {key_path}",
            )

    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        word = _string(tls, name, prefix, fail) or default
        if word not in TLS_VERSIONS:
            raise fail(f"{prefix}.{name}", f"{word!r}: expected one of {', '.join(TLS_VERSIONS)}")
        versions[name] = TLS_VERSIONS[word]
    if versions["min_version"] > versions["max_version"]:
        raise fail(f"{prefix}.min_version", "must not be above max_version")
    try:
        context.minimum_version = versions["min_version"]
        context.maximum_version = versions["max_version"]
    except (ValueError, ssl.SSLError) as exc:
        raise fail(f"{prefix}.min_version", f"not available in this OpenSSL: {exc}") from None

    prefer = tls.get("prefer_server_cipher_suites")
    if prefer is not None and not isinstance(prefer, bool):
        raise fail(f"{prefix}.prefer_server_cipher_suites", "expected true or false")
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE

    ca = _string(tls, "client_ca_file", prefix, fail)
    auth = _string(tls, "client_auth_type", prefix, fail)
    if auth is None:
        # exporter-toolkit: a client CA without an auth type means "require and verify".
        auth = "RequireAndVerifyClientCert" if ca else "NoClientCert"
    if auth in _UNVERIFIED_CLIENT_AUTH:
        raise fail(
            f"{prefix}.client_auth_type",
            f"{auth} (a client certificate that is not verified) is not supported by gputel; "
            "use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
        )
    if auth not in CLIENT_AUTH_TYPES:
        raise fail(
            f"{prefix}.client_auth_type",
            f"{auth!r}: expected one of {', '.join(CLIENT_AUTH_TYPES)}",
        )
    if auth != "NoClientCert" and ca is None:
        raise fail(f"{prefix}.client_ca_file", f"required with client_auth_type {auth}")
    if ca is not None:
        ca_path = base / Path(ca).expanduser()
        if not ca_path.is_file():
            raise fail(f"{prefix}.client_ca_file", f"{ca_path}: no such file")
        try:
            context.load_verify_locations(cafile=ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise fail(f"{prefix}.client_ca_file", f"cannot load {ca_path}: {exc}") from None
    context.verify_mode = CLIENT_AUTH_TYPES[auth]
    return context


def _users(value: object, fail: FailFn) -> dict[str, bytes]:
    key = "basic_auth_users"
    if value is None:
        return {}
    users: dict[str, bytes] = {}
    for user, hashed in _mapping(value, key, fail).items():
        if not user or ":" in user:
            raise fail(f"{key}.{user}", "a user name must be non-empty and contain no ':'")
        if (
            not isinstance(hashed, str)
            or not hashed.startswith(_BCRYPT_PREFIXES)
            or len(hashed) != 60
        ):
            raise fail(
                f"{key}.{user}",
                "expected a bcrypt hash ($2b$..., 60 characters; make one with "
                "htpasswd -nBC 10 \"\" | tr -d ':\\n')",
            )
        users[user] = hashed.encode("ascii", "replace")
    return users
