"""Opening an authenticated paramiko Transport: socket or jump channel, host-key check, key auth.

Transient failures (refused, timed out, unreachable, a handshake cut short) are retried with
exponential backoff; DNS failures, authentication failures and host-key problems never are.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko

from llamactl.errors import ConnectError
from llamactl.remote.hostkeys import fingerprint, preferred_key_types, verify_host_key
from llamactl.remote.target import Hop, SSHTarget

log = logging.getLogger("llamactl.remote")
# paramiko's transport thread logs every failed handshake with a traceback at ERROR level; with no
# logging configured Python would print that to stderr next to our one-line error. We report those
# failures ourselves, so keep paramiko quiet unless someone opts back in (propagate = True).
_paramiko_log = logging.getLogger("paramiko")
_paramiko_log.addHandler(logging.NullHandler())
_paramiko_log.propagate = False

_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                     errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTDOWN}
_DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
KEEPALIVE_S = 15
DEAD_PEER_S = 60


class _Transient(Exception):
    """A failure worth another attempt; carries the user-facing message."""


def open_transports(target: SSHTarget, *, sleep: Callable[[float], None] = time.sleep
                    ) -> list[paramiko.Transport]:
    """Transports for each jump hop and finally the target (last). Caller closes them in reverse."""
    opened: list[paramiko.Transport] = []
    hops = (*target.jump, target.as_hop())
    try:
        for i, hop in enumerate(hops):
            via = (opened[-1], hops[i - 1]) if opened else None
            opened.append(_with_retries(target, hop, functools.partial(_connect_hop, target, hop, via), sleep))
    except BaseException:
        for t in reversed(opened):
            t.close()
        raise
    return opened


def _with_retries(target: SSHTarget, hop: Hop, attempt: Callable[[], paramiko.Transport],
                  sleep: Callable[[float], None]) -> paramiko.Transport:
    attempts = 1 + max(0, target.retries)
    for i in range(attempts):
        try:
            return attempt()
        except _Transient as exc:
            if i + 1 == attempts:
                tries = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
                raise ConnectError(target.name, f"{_hop_prefix(target, hop)}{exc}{tries}") from None
            delay = target.retry_backoff_s * 2**i
            log.debug("%s: %s; retrying in %.1f s", target.name, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _hop_prefix(target: SSHTarget, hop: Hop) -> str:
    return "" if hop.name == target.name and hop.address == target.address else f"jump host {hop.name}: "


Via = tuple[paramiko.Transport, Hop]  # the previous hop's connection, and that hop


def _open_socket(target: SSHTarget, hop: Hop, via: Via | None) -> socket.socket | paramiko.Channel:
    where, timeout = f"{hop.address}:{hop.port}", target.connect_timeout_s
    if via is not None:  # ProxyJump: a direct-tcpip channel opened by the previous hop's sshd
        try:
            return via[0].open_channel("direct-tcpip", (hop.address, hop.port), ("127.0.0.1", 0),
                                       timeout=timeout)
        except paramiko.ChannelException as exc:
            raise _Transient(f"jump host {via[1].name} cannot open a connection to {where}: {exc.text}") from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise _Transient(f"cannot open a tunnel to {where}: {str(exc) or type(exc).__name__}") from exc
    try:
        sock = socket.create_connection((hop.address, hop.port), timeout=timeout)
        _detect_dead_peer(sock)
        return sock
    except socket.gaierror as exc:
        message = f"cannot resolve host name {hop.address!r}: {exc.strerror}"
        if exc.errno == socket.EAI_AGAIN:
            raise _Transient(message) from exc
        raise ConnectError(target.name, _hop_prefix(target, hop) + message) from exc
    except TimeoutError as exc:
        raise _Transient(f"connection to {where} timed out after {timeout:g} s") from exc
    except OSError as exc:
        message = f"cannot connect to {where}: {exc.strerror or exc}"
        if exc.errno in _TRANSIENT_ERRNOS:
            raise _Transient(message) from exc
        raise ConnectError(target.name, _hop_prefix(target, hop) + message) from exc


def _detect_dead_peer(sock: socket.socket) -> None:
    """A host that vanishes (power loss, network cut) sends no RST. paramiko's keepalive packets
    then sit unacknowledged; TCP_USER_TIMEOUT turns that into a socket error after DEAD_PEER_S, so a
    running command fails with "connection lost" instead of hanging for TCP's ~15 minutes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(DEAD_PEER_S * 1000))


def _connect_hop(target: SSHTarget, hop: Hop, via: Via | None) -> paramiko.Transport:
    sock = _open_socket(target, hop, via)
    transport = paramiko.Transport(sock)
    try:
        timeout = target.connect_timeout_s
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
        transport.get_security_options().key_types = preferred_key_types(
            target.known_hosts, hop.address, hop.port)
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # An sshd at MaxStartups or still starting drops us mid-handshake: worth retrying.
            raise _Transient(f"SSH handshake with {hop.address}:{hop.port} failed: "
                             f"{str(exc) or type(exc).__name__}") from exc
        if not (transport.is_active() and transport.initial_kex_done):  # start_client's timeout is silent
            raise _Transient(f"SSH handshake with {hop.address}:{hop.port} failed: no answer within {timeout:g} s")
        try:
            verify_host_key(host=target.name, address=hop.address, port=hop.port,
                            key=transport.get_remote_server_key(), known_hosts=target.known_hosts,
                            policy=target.host_key_policy)
        except ConnectError as exc:
            raise ConnectError(target.name, _hop_prefix(target, hop) + str(exc).split(": ", 1)[1]) from None
        _authenticate(target, hop, transport)
        transport.set_keepalive(KEEPALIVE_S)
        return transport
    except BaseException:
        transport.close()
        raise


def _candidate_keys(target: SSHTarget, hop: Hop, notes: list[str], agent: paramiko.Agent | None
                    ) -> Iterator[tuple[str, paramiko.PKey]]:
    """Identity files (hop's, then target's, else ssh's defaults), then the agent's keys."""
    files = list(dict.fromkeys((*hop.identity_files, *target.identity_files)))
    offered: set[bytes] = set()
    defaults = not files and target.look_for_keys
    for path in files or [Path(p).expanduser() for p in (_DEFAULT_KEYS if defaults else ())]:
        if not path.exists():
            if not defaults:
                notes.append(f"identity file {path} not found")
            continue
        try:
            key = paramiko.PKey.from_path(path)
        except (paramiko.PasswordRequiredException, TypeError) as exc:
            # paramiko 5 lets cryptography's TypeError through for encrypted OpenSSH-format keys.
            if isinstance(exc, TypeError) and "password" not in str(exc).lower():
                notes.append(f"identity file {path} unusable: {exc}")
            else:
                notes.append(f"identity file {path} is passphrase-protected (add it to ssh-agent)")
            continue
        except (paramiko.SSHException, OSError, ValueError) as exc:
            notes.append(f"identity file {path} unusable: {exc}")
            continue
        offered.add(key.asbytes())
        yield f"{path} ({key.get_name()} {fingerprint(key)})", key
    try:
        agent_keys = agent.get_keys() if agent is not None else ()
    except (paramiko.SSHException, OSError) as exc:
        notes.append(f"ssh-agent unusable: {exc}")
        agent_keys = ()
    for agent_key in agent_keys:
        if agent_key.asbytes() not in offered:  # the agent often holds the identity file's key too
            yield f"agent key {agent_key.get_name()} {fingerprint(agent_key)}", agent_key


def _authenticate(target: SSHTarget, hop: Hop, transport: paramiko.Transport) -> None:
    user, where = hop.user, f"{hop.address}:{hop.port}"
    prefix = _hop_prefix(target, hop)
    try:
        transport.auth_none(user)
        return  # the server wants no authentication at all
    except paramiko.BadAuthenticationType as exc:
        allowed = list(exc.allowed_types)
    except paramiko.AuthenticationException:
        allowed = []
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise ConnectError(target.name, f"{prefix}connection to {where} lost during authentication: {exc}") from exc
    methods = ", ".join(allowed) or "unknown"
    if allowed and "publickey" not in allowed:
        raise ConnectError(target.name, f"{prefix}authentication failed for user {user!r} at {where}: the "
                                        f"server accepts only {methods}; llamactl uses public keys")
    # The agent connection must stay open while its keys sign the authentication request.
    notes: list[str] = []  # filled by _candidate_keys as it skips unusable identity files
    agent: paramiko.Agent | None = None
    if target.allow_agent:
        try:
            agent = paramiko.Agent()
        except (paramiko.SSHException, OSError) as exc:
            notes.append(f"ssh-agent unusable: {exc}")
    try:
        _try_keys(target, hop, transport, _candidate_keys(target, hop, notes, agent), methods, notes)
    finally:
        if agent is not None:
            agent.close()


def _try_keys(target: SSHTarget, hop: Hop, transport: paramiko.Transport,
              keys: Iterator[tuple[str, paramiko.PKey]], methods: str, notes: list[str]) -> None:
    user, where, prefix = hop.user, f"{hop.address}:{hop.port}", _hop_prefix(target, hop)
    tried: list[str] = []
    for description, key in keys:
        try:
            remaining = transport.auth_publickey(user, key)
        except paramiko.AuthenticationException:
            tried.append(description)
            continue
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectError(target.name, f"{prefix}connection to {where} lost during authentication "
                                            f"(tried {', '.join(tried + [description])}): {exc}") from exc
        if transport.is_authenticated():
            log.debug("%s: authenticated as %s with %s", target.name, user, description)
            return
        raise ConnectError(target.name, f"{prefix}{where} accepted {description} for {user!r} but then "
                                        f"requires {', '.join(remaining)}; llamactl supports keys only")
    attempts = "; tried " + ", ".join(tried) if tried else "; no key was offered"
    detail = "; " + "; ".join(notes) if notes else ""
    if not tried and not notes:
        detail = " (no identity file, none of ~/.ssh/id_*, and no ssh-agent keys via SSH_AUTH_SOCK)"
    raise ConnectError(target.name, f"{prefix}authentication failed for user {user!r} at {where} "
                                    f"(server accepts: {methods}){attempts}{detail}")
