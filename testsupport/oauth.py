"""Token auth against the real Azurite: a managed-identity token endpoint and an HTTPS Azurite that checks tokens.

- `TokenEndpoint`: the App Service managed-identity protocol (IDENTITY_ENDPOINT + IDENTITY_HEADER), which
  azure-identity's ManagedIdentityCredential speaks when those variables are set; it issues JWTs Azurite's
  `--oauth basic` accepts (issuer, audience and lifetime are checked, the signature is not), each valid for
  `lifetime_s`, and counts them.
- `running_oauth_azurite`: Azurite over HTTPS (bearer tokens are refused over HTTP) with a self-signed
  certificate for 127.0.0.1, whose path clients get as their CA bundle.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from testsupport.azurite import ACCOUNT, AZURITE_QUEUE, stop_azurite
from testsupport.net import free_port, wait_for_port

IDENTITY_HEADER = "test-identity-header"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class TokenEndpoint(ThreadingHTTPServer):
    def __init__(self, lifetime_s: int = 3600) -> None:
        super().__init__(("127.0.0.1", 0), _IssueToken)
        self.lifetime_s = lifetime_s
        self.issued = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/msi/token"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> TokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()
        self.server_close()

    def token(self) -> tuple[str, int]:
        now = int(time.time())
        expires = now + self.lifetime_s
        claims = {"aud": "https://storage.azure.com", "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
                  "iat": now, "nbf": now - 60, "exp": expires, "oid": "test-identity"}
        self.issued += 1
        return f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk", expires


class _IssueToken(BaseHTTPRequestHandler):
    server: TokenEndpoint

    def do_GET(self) -> None:  # noqa: N802
        query = parse_qs(urlsplit(self.path).query)
        if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER or "resource" not in query:
            self.send_error(400, "missing the identity header or resource")
            return
        token, expires = self.server.token()
        body = json.dumps({"access_token": token, "expires_on": str(expires), "resource": query["resource"][0],
                           "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1; the certificate is its own CA bundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "azurite-cert.pem", directory / "azurite-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass(frozen=True)
class OAuthAzurite:
    port: int
    ca_bundle: Path

    @property
    def account_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/{ACCOUNT}"


@contextmanager
def running_oauth_azurite(workdir: Path) -> Iterator[OAuthAzurite]:
    cert, key = self_signed_certificate(workdir)
    port = free_port()
    with (workdir / "azurite-oauth.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(AZURITE_QUEUE), "--queueHost", "127.0.0.1", "--queuePort", str(port), "--inMemoryPersistence",
             "--skipApiVersionCheck", "--disableTelemetry", "--loose", "--oauth", "basic", "--cert", str(cert), "--key", str(key)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
        try:
            wait_for_port(port)
            yield OAuthAzurite(port, cert)
        finally:
            stop_azurite(proc)
