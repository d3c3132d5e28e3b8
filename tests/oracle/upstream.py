"""An origin server for passthrough tests: it reports exactly what reached it.

Routes (any method):
  /bytes/N            N deterministic bytes with a Content-Length
  /gate/NAME          a chunked answer: "first;" at once, "second" once /open/NAME is called
  /open/NAME          releases /gate/NAME
  /seen               JSON list of events ("NAME:first" once the first body chunk of an
                      upload to /upload/NAME arrived)
  /reason             200 with the reason phrase "Fine By Me" and a header `X-Mixed-Case`
  anything else       JSON: method, target, headers, body length and SHA-256

usage: upstream.py PORT [CERT KEY]   (TLS when a certificate and key are given)
"""

import hashlib
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

gates = {}
events = []
lock = threading.Lock()


def gate(name):
    with lock:
        return gates.setdefault(name, threading.Event())


def pattern(n):
    return bytes((i * 7 + 3) % 251 for i in range(n))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self, on_first_chunk=None):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
                if on_first_chunk:
                    on_first_chunk()
                    on_first_chunk = None
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream", "yes")
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        parts = self.path.split("?")[0].split("/")
        if len(parts) == 3 and parts[1] == "bytes":
            self.read_body()
            return self.reply(200, pattern(int(parts[2])), "application/octet-stream")
        if len(parts) == 3 and parts[1] == "open":
            self.read_body()
            gate(parts[2]).set()
            return self.reply(200, b"{}")
        if self.path == "/seen":
            self.read_body()
            with lock:
                return self.reply(200, json.dumps(events).encode())
        if self.path == "/reason":
            self.read_body()
            self.send_response(200, "Fine By Me")
            self.send_header("X-Mixed-Case", "kept")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if len(parts) == 3 and parts[1] == "gate":
            self.read_body()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"6\r\nfirst;\r\n")
            self.wfile.flush()
            gate(parts[2]).wait(30)
            self.wfile.write(b"6\r\nsecond\r\n0\r\n\r\n")
            return None

        def first():
            if len(parts) == 3 and parts[1] == "upload":
                with lock:
                    events.append(parts[2] + ":first")

        body = self.read_body(first)
        report = {
            "method": self.command,
            "target": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        status = 201 if self.command == "PUT" else 200
        return self.reply(status, json.dumps(report).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = handle_any

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "42")
        self.end_headers()


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    if len(sys.argv) == 4:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
