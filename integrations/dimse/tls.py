"""DICOM TLS (PS3.15 B.1, B.9): TLS 1.2 or newer on every DIMSE connection nightread makes or accepts.

`TlsConfig` is what a source or a receiver is given (built from the settings at the edge);
`client_context` and `server_context` make the `ssl.SSLContext` both receive paths use, nightread's
own (the socket is wrapped) and pynetdicom's (`tls_args` / `ssl_context`). A certificate that cannot
be loaded is a ConfigurationError naming the file; a peer whose certificate is not trusted is
PeerRefused (retrying will not help).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from integrations.errors import ConfigurationError, PeerRefused, TransientError


@dataclass(frozen=True)
class TlsConfig:
    """Client: `ca_file` verifies the peer (None: the system's CAs), `cert_file`/`key_file` answer a
    peer that asks for a certificate. Server: `cert_file`/`key_file` are required, and with
    `require_client_cert` a client must present a certificate signed by `ca_file`."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True
    require_client_cert: bool = False


def _load_chain(context: ssl.SSLContext, config: TlsConfig) -> None:
    if config.cert_file is None or config.key_file is None:
        return
    try:
        context.load_cert_chain(certfile=str(config.cert_file), keyfile=str(config.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"TLS certificate {config.cert_file} with key {config.key_file} cannot be loaded: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, config: TlsConfig) -> None:
    try:
        if config.ca_file is not None:
            context.load_verify_locations(cafile=str(config.ca_file))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"TLS CA bundle {config.ca_file} cannot be loaded: {exc}") from exc


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """For our SCUs: the PACS's certificate verified (and its host name, with `check_hostname`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = config.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, config)
    _load_chain(context, config)
    return context


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """For our SCPs: our certificate; with `require_client_cert`, mutual TLS against `ca_file`."""
    if config.cert_file is None or config.key_file is None:
        raise ConfigurationError("a TLS storage SCP needs tls.cert_file and tls.key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, config)
    if config.require_client_cert:
        if config.ca_file is None:
            raise ConfigurationError("mutual TLS needs tls.ca_file to check client certificates against")
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, config)
    return context


def wrap_client(sock: socket.socket, context: ssl.SSLContext, *, host: str, peer: str) -> ssl.SSLSocket:
    """The TLS handshake as client on a connected socket; an untrusted certificate is PeerRefused."""
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise PeerRefused(f"TLS: the certificate of {peer} at {host} is not trusted ({exc.verify_message})") from exc
    except ssl.SSLError as exc:
        sock.close()
        raise PeerRefused(f"TLS handshake with {peer} at {host} failed: {exc.reason or exc}") from exc
    except OSError as exc:
        sock.close()
        raise TransientError(f"TLS handshake with {peer} at {host}: connection lost ({exc})") from exc
