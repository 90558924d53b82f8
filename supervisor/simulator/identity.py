"""The managed-identity token endpoint of the IMDS simulator: GET /metadata/identity/oauth2/token.

azure-identity's ManagedIdentityCredential finds it through AZURE_POD_IDENTITY_AUTHORITY_HOST (the IMDS
host override). The answer has IMDS's shape: access_token, expires_in and expires_on as strings,
token_type Bearer. `IdentityEndpoint.available = False` makes it answer 503 (the identity is down).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

TOKEN_PATH = "/metadata/identity/oauth2/token"


@dataclass
class IdentityEndpoint:
    available: bool = True
    lifetime_s: int = 3600
    requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, query: dict[str, list[str]], metadata_header: str | None) -> tuple[int, dict[str, Any]]:
        flat = {key: values[0] for key, values in query.items() if values}
        with self.lock:
            self.requests.append(flat)
            available = self.available
        if (metadata_header or "").lower() != "true":
            return 400, {"error": "invalid_request", "error_description": "Required metadata header not specified"}
        if not flat.get("resource"):
            return 400, {"error": "invalid_request", "error_description": "Required audience parameter not specified"}
        if not available:
            return 503, {"error": "service_unavailable", "error_description": "the identity endpoint is down (simulated)"}
        now = int(time.time())
        return 200, {"access_token": f"standin-{uuid.uuid4().hex}", "client_id": flat.get("client_id", "system-assigned"),
                     "expires_in": str(self.lifetime_s), "expires_on": str(now + self.lifetime_s),
                     "ext_expires_in": str(self.lifetime_s), "not_before": str(now), "resource": flat["resource"],
                     "token_type": "Bearer"}
