"""How the platform reaches a factory's MQTT broker: the broker URL (logins, TLS) and topic
prefixes (bridges, the Fischertechnik cloud). Pure Python: paho is configured duck-typed.

URLs: ``mqtt://host:1883``, ``mqtt://user:password@host:1883`` (the TXT's own Mosquitto 1.6
wants user ``txt``), ``mqtts://host:8883`` (TLS with the system CAs, or ``ca_file``; an
optional client certificate). A password can stay out of the URL and the process list:
``FACTORY_MQTT_PASSWORD`` (or the variable named by ``password_env``) supplies it.
``str(target)`` and ``target.redacted`` never show the password.

Prefixes: a bridge or the cloud puts every controller topic under a prefix
(``/j1/txt/1/i/cam``). ``TopicPrefix("/j1/txt/1/", "factory-7")`` maps both ways:
``full("i/cam")`` and ``strip(topic) -> "i/cam"`` (None when the topic is not under it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}
DEFAULT_PASSWORD_ENV = "FACTORY_MQTT_PASSWORD"


@dataclass(frozen=True)
class MqttTarget:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str, *, ca_file: str | None = None, cert_file: str | None = None,
              key_file: str | None = None, password_env: str | None = None) -> "MqttTarget":
        """``mqtt[s]://[user[:password]@]host[:port]``; ``ca_file``/``cert_file`` imply TLS.
        The password, when the URL has none, comes from ``password_env`` (default
        ``FACTORY_MQTT_PASSWORD``) if it is set."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        scheme = parsed.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported MQTT URL scheme {parsed.scheme!r} "
                             "(use mqtt://[user:password@]host:port or mqtts://host:8883)")
        tls = SCHEMES[scheme] or bool(ca_file or cert_file)
        try:
            port = parsed.port
        except ValueError as exc:
            raise ValueError(f"bad port in MQTT URL {redact(url)}") from exc
        username = unquote(parsed.username) if parsed.username else None
        password = unquote(parsed.password) if parsed.password is not None else None
        if password is None and username is not None:
            password = os.environ.get(password_env or DEFAULT_PASSWORD_ENV) or None
        return cls(host=parsed.hostname or "127.0.0.1", port=port or (8883 if tls else 1883),
                   username=username, password=password, tls=tls, ca_file=ca_file, cert_file=cert_file,
                   key_file=key_file)

    @property
    def redacted(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username and self.password else (
            f"{self.username}@" if self.username else "")
        return f"{scheme}://{user}{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.redacted

    def configure(self, client) -> None:
        """Set login and TLS on a paho ``Client`` before it connects."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            import ssl

            client.tls_set(ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)


def redact(url: str) -> str:
    """An MQTT URL fit for logs: the password becomes ``***``."""
    try:
        return MqttTarget.parse(url, password_env="\0unset").redacted
    except ValueError:
        from factory_assets.vocabulary.messages import redact_url

        return redact_url(url)


@dataclass(frozen=True)
class TopicPrefix:
    """One factory behind a prefix: ``prefix`` + controller topic, documents stamped ``factory_id``."""
    prefix: str = ""
    factory_id: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "TopicPrefix":
        """``PREFIX[=FACTORY_ID]`` as given to ``--prefix``: ``/j1/txt/1/=factory-7``. A prefix
        is a topic level: a trailing ``/`` is added when missing (``""`` means no prefix)."""
        prefix, _, factory_id = spec.partition("=")
        if any(c in prefix for c in "#+"):
            raise ValueError(f"a topic prefix cannot hold MQTT wildcards: {prefix!r}")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(prefix, factory_id.strip() or None)

    def full(self, topic: str) -> str:
        return self.prefix + topic

    def strip(self, topic: str) -> str | None:
        if not topic.startswith(self.prefix):
            return None
        return topic[len(self.prefix):]

    @property
    def subscription(self) -> str:
        return self.prefix + "#"


def match_prefix(prefixes, topic: str) -> tuple["TopicPrefix", str] | None:
    """The prefix (longest first) a received topic is under and the controller topic it carries."""
    for p in sorted(prefixes, key=lambda p: len(p.prefix), reverse=True):
        inner = p.strip(topic)
        if inner is not None:
            return p, inner
    return None
