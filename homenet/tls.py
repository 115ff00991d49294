"""The broker's TLS certificate: made by the gateway on first start, pinned by fingerprint.

There is no CA in a home. The gateway makes a self-signed certificate; agents learn its
SHA-256 fingerprint from the signed beacon (or from their settings), fetch the certificate
once, check the fingerprint, and from then on trust exactly that certificate: a broker
presenting any other one fails the TLS handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import ssl
from pathlib import Path

from homenet.durable import write_atomic


class CertificateMismatch(ssl.SSLError):
    """The broker presented a certificate other than the pinned one."""


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, hex: what the beacon carries."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def ensure_certificate(cert: Path, key: Path, name: str = "homenet-gateway") -> bytes:
    """The gateway's certificate (PEM), made on first use: EC P-256, ten years, self-signed."""
    if cert.exists() and key.exists():
        return cert.read_bytes()
    # here, not at the top: the agent pins certificates with `ssl` alone and need not load x509
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(private, hashes.SHA256()))
    write_atomic(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), mode=0o600)
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    write_atomic(cert, pem, mode=0o644)
    return pem


def pin_certificate(host: str, port: int, expected: str, path: Path, timeout: float = 10.0) -> Path:
    """Fetch the broker's certificate, check its fingerprint, keep it as the only trust anchor."""
    if path.exists() and fingerprint(path.read_bytes()) == expected.lower():
        return path
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read the certificate; nothing is sent
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    got = hashlib.sha256(der).hexdigest()
    if got != expected.lower():
        raise CertificateMismatch(f"broker {host}:{port} presented certificate {got[:16]}..., "
                                  f"not the pinned {expected[:16]}...; refusing to connect")
    write_atomic(path, ssl.DER_cert_to_PEM_cert(der).encode(), mode=0o644)
    return path
