"""A local HTTP server standing in for Stripe's API, and webhooks signed the way Stripe signs them.

Stripe's API cannot be reached from the test machines, so the adapter's outgoing calls go
here. It serves only what the adapter calls (POST /v1/payment_intents), honours the
Idempotency-Key header as Stripe does (a repeated key returns the first answer and charges
nothing more) and declines the cards of `declined` customers with Stripe's card_error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl


class StripeStandIn:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.charges: list[dict[str, Any]] = []  # one per PaymentIntent created
        self.requests = 0
        self.declined: set[str] = set()
        self._answers: dict[str, tuple[int, bytes]] = {}  # idempotency key -> first answer
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StripeStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, path: str, headers: Any, body: str) -> tuple[int, bytes]:
        with self._lock:
            self.requests += 1
            if headers.get("Authorization") != f"Bearer {self.api_key}":
                return 401, _error("invalid_request_error", "Invalid API Key provided")
            if path != "/v1/payment_intents":
                return 404, _error("invalid_request_error", f"Unrecognized request URL (POST: {path})")
            key = headers.get("Idempotency-Key")
            if key in self._answers:
                return self._answers[key]
            params = dict(parse_qsl(body))
            metadata = {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[")}
            if params.get("customer") in self.declined:
                answer = 402, _error("card_error", "Your card was declined.", code="card_declined")
            else:
                intent = {
                    "id": f"pi_test_{len(self.charges) + 1}",
                    "object": "payment_intent",
                    "amount": int(params["amount"]),
                    "currency": params["currency"],
                    "customer": params.get("customer"),
                    "payment_method": params.get("payment_method"),
                    "description": params.get("description"),
                    "status": "succeeded",
                    "metadata": metadata,
                }
                self.charges.append(
                    {**intent, "off_session": params.get("off_session"), "confirm": params.get("confirm")}
                )
                answer = 200, json.dumps(intent).encode()
            if key:
                self._answers[key] = answer
            return answer

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                status, payload = standin._answer(self.path, self.headers, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Request-Id", f"req_{standin.requests}")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                pass

        return Handler


def _error(kind: str, message: str, **extra: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message, **extra}}).encode()


def signed_event(secret: str, event_id: str, kind: str, obj: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A webhook body and its Stripe-Signature header (t=..., v1=HMAC-SHA256 of "t.body")."""
    event = {
        "id": event_id,
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": int(time.time()),
        "type": kind,
        "livemode": False,
        "data": {"object": obj},
    }
    payload = json.dumps(event).encode()
    stamp = str(int(time.time()))
    signature = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, {"Stripe-Signature": f"t={stamp},v1={signature}", "Content-Type": "application/json"}
