"""TLS for replfs's links: the pair's certificates, and securing a connected stream.

Used by the replication link (``net { tls yes; }`` in replfs.conf) and by
the cluster link (``tls = yes`` in cluster.conf's cluster stanza).  Each
node has its own key and a certificate whose common name (and DNS
subject alternative name) is its node name, signed by a certificate
authority made for the pair: ``replfsadm tls-keygen`` makes all of it
with the ``cryptography`` package.  A link is mutually authenticated:
both ends present their certificate, both check the other's against the
CA ("keyring") and check that the name in it is the node expected on
that link.  TLS 1.3 only.

The files, by default in ``tls/`` next to the configuration file:
``ca.crt`` (the keyring), ``ca.key`` (only needed to make more
certificates), ``NODE.crt`` and ``NODE.key``.
"""
from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass

import trio

from replfs.filemode import check_secret_file

DEFAULT_DIR = "tls"
DEFAULT_DAYS = 3650


class TLSError(Exception):
    """A TLS link could not be set up (files, handshake, wrong peer)."""


@dataclass(frozen=True)
class TLSFiles:
    """Where one node's TLS material is."""
    certificate: str
    privkey: str
    keyring: str            # the trusted CA certificate(s), PEM

    @classmethod
    def in_dir(cls, directory: str, node: str) -> "TLSFiles":
        return cls(certificate=os.path.join(directory, f"{node}.crt"),
                   privkey=os.path.join(directory, f"{node}.key"),
                   keyring=os.path.join(directory, "ca.crt"))


def default_dir(conf_path: str | None) -> str:
    """``tls/`` next to the configuration file."""
    base = os.path.dirname(os.path.abspath(conf_path)) if conf_path else "/etc/replfs"
    return os.path.join(base, DEFAULT_DIR)


def resource_files(net, node: str, conf_path: str | None) -> TLSFiles:
    """Where ``node``'s TLS files are for a resource whose net section is
    ``net`` (anything with ``get(name)``): the options tls-certificate,
    tls-privkey and tls-keyring (files, in replfs; relative ones next to
    the configuration file), each by default in tls/ next to it."""
    base = os.path.dirname(os.path.abspath(conf_path)) if conf_path else "/etc/replfs"
    dflt = TLSFiles.in_dir(default_dir(conf_path), node)

    def path(option: str, default: str) -> str:
        value = net.get(option)
        return os.path.join(base, value) if value else default
    return TLSFiles(certificate=path("tls-certificate", dflt.certificate),
                    privkey=path("tls-privkey", dflt.privkey),
                    keyring=path("tls-keyring", dflt.keyring))


@dataclass(frozen=True)
class Contexts:
    """The two SSL contexts of one node (accepting and connecting side)."""
    server: ssl.SSLContext
    client: ssl.SSLContext
    files: TLSFiles
    warnings: tuple[str, ...] = ()


def _context(purpose: int, files: TLSFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Names are checked by handshake() for both sides alike (a node name,
    # not the address the connection went to).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    for what, path in (("certificate", files.certificate), ("private key", files.privkey),
                       ("keyring (CA certificate)", files.keyring)):
        if not os.path.exists(path):
            raise TLSError(f"TLS {what} {path} does not exist (make the pair's certificates "
                           f"with 'replfsadm tls-keygen')")
    try:
        ctx.load_cert_chain(files.certificate, files.privkey)
    except (ssl.SSLError, OSError) as e:
        raise TLSError(f"cannot load TLS certificate {files.certificate} with key "
                       f"{files.privkey}: {_reason(e)}") from None
    try:
        ctx.load_verify_locations(cafile=files.keyring)
    except (ssl.SSLError, OSError) as e:
        raise TLSError(f"cannot load TLS keyring {files.keyring}: {_reason(e)}") from None
    return ctx


def load(files: TLSFiles) -> Contexts:
    """Both contexts for ``files``; TLSError names the file at fault."""
    server = _context(ssl.PROTOCOL_TLS_SERVER, files)
    client = _context(ssl.PROTOCOL_TLS_CLIENT, files)
    warning = check_secret_file(files.privkey, "the TLS private key",
                                "anyone who reads it can pose as this node")
    return Contexts(server, client, files, (warning,) if warning else ())


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or e.strerror or str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def peer_name(cert: dict | None) -> str | None:
    """The common name in a certificate as ssl's getpeercert() gives it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


async def handshake(stream: trio.abc.Stream, ctxs: Contexts, *, server_side: bool,
                    expected: set[str] | frozenset[str] | str, where: str) -> tuple[trio.SSLStream, str]:
    """Run the TLS handshake on ``stream``; return the secured stream and
    the peer's node name, which is (one of) ``expected``.  TLSError says
    why a peer was refused, in words an admin can act on."""
    names = {expected} if isinstance(expected, str) else set(expected)
    ssl_stream = trio.SSLStream(stream, ctxs.server if server_side else ctxs.client,
                                server_side=server_side,
                                https_compatible=False)
    try:
        await ssl_stream.do_handshake()
    except trio.BrokenResourceError as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLError):
            why = _reason(cause)
            hint = ""
            if why in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING",
                       "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"):
                hint = (" (the peer closed the connection or spoke plain text: does it have TLS "
                        "enabled, and does it trust our certificate?)")
            elif why == "CERTIFICATE_VERIFY_FAILED":
                msg = getattr(cause, "verify_message", None) or "not signed by a trusted CA"
                hint = f": {msg} (keyring {ctxs.files.keyring})"
            elif why.startswith("TLSV1_ALERT") or why.startswith("SSLV3_ALERT"):
                hint = " (the peer refused our certificate)"
            raise TLSError(f"TLS handshake with {where} failed: {why}{hint}") from None
        raise TLSError(f"TLS handshake with {where} failed: the connection closed (does the "
                       f"peer have TLS enabled, and does it trust our certificate?)") from None
    name = peer_name(ssl_stream.getpeercert())
    if name not in names:
        raise TLSError(f"TLS: the peer at {where} presented a certificate for "
                       f"'{name}', expected {' or '.join(repr(n) for n in sorted(names))}")
    return ssl_stream, name


def description(stream: trio.abc.Stream) -> str | None:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' for a secured stream, else None."""
    if isinstance(stream, trio.SSLStream):
        try:
            cipher = stream.cipher()
            return f"{stream.version()} {cipher[0]}" if cipher else stream.version()
        except (trio.NeedHandshakeError, AttributeError):
            return None
    return None


# ------------------------------------------------------------ making keys

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "replfs"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, days: int = DEFAULT_DAYS):
    """A new CA key and self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_node_cert(ca_key, ca_cert, node: str, days: int = DEFAULT_DAYS):
    """A new key and certificate for ``node``, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(_name(node)).issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: str, data: bytes, mode: int) -> None:
    """Write a new file with ``mode`` from the start (never a moment
    readable by others), atomically replacing any old one."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def keygen(directory: str, nodes: list[str], *, days: int = DEFAULT_DAYS,
           force: bool = False, ca_name: str = "replfs pair CA") -> list[tuple[str, str]]:
    """Make what is missing in ``directory``: the CA (unless ca.crt and
    ca.key are there) and a key and certificate for each node.  With
    ``force``, a new CA and new certificates for every node replace the
    old ones.  Returns (path, what) for each file written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca_crt = os.path.join(directory, "ca.crt")
    ca_key_path = os.path.join(directory, "ca.key")
    written: list[tuple[str, str]] = []
    have_ca = os.path.exists(ca_crt) and os.path.exists(ca_key_path)
    if have_ca and not force:
        try:
            with open(ca_crt, "rb") as f:
                ca_cert = x509.load_pem_x509_certificate(f.read())
            with open(ca_key_path, "rb") as f:
                ca_key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise TLSError(f"cannot read the CA in {directory}: {e} "
                           f"(--force makes a new one, and new certificates for every node)"
                           ) from None
    else:
        if not force and (os.path.exists(ca_crt) or os.path.exists(ca_key_path)):
            raise TLSError(f"{directory} has only one of ca.crt and ca.key; --force makes a "
                           f"new CA (and new certificates for every node)")
        ca_key, ca_cert = make_ca(ca_name, days)
        _write(ca_key_path, _pem_key(ca_key), 0o600)
        _write(ca_crt, _pem_cert(ca_cert), 0o644)
        written += [(ca_crt, "CA certificate (the keyring)"), (ca_key_path, "CA private key")]
        force = True        # every node's certificate must come from the new CA
    for node in nodes:
        files = TLSFiles.in_dir(directory, node)
        if not force and os.path.exists(files.certificate) and os.path.exists(files.privkey):
            continue
        key, cert = make_node_cert(ca_key, ca_cert, node, days)
        _write(files.privkey, _pem_key(key), 0o600)
        _write(files.certificate, _pem_cert(cert), 0o644)
        written += [(files.certificate, f"certificate of {node}"),
                    (files.privkey, f"private key of {node}")]
    return written
