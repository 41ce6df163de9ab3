"""A threaded HTTP test server on 127.0.0.1 with a scripted reply per request, for the tests of
the HTTP client, the HTTP reward, the chat-completions evolver and the round loop's handling
of failing servers.

    server = Server(lambda n, body: Reply(status=500) if n < 2 else Reply(body={...}))
    ... server.url, server.count, server.requests, server.max_in_flight ...
    server.close()
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, NamedTuple


class Reply(NamedTuple):
  status: int = 200
  body: Any = None  # JSON-encoded unless bytes
  delay_s: float = 0.0
  headers: dict = {}


class Request(NamedTuple):
  path: str
  headers: dict
  body: Any


class Server:
  """A threaded HTTP server on 127.0.0.1 answering every POST with `reply(n, request_json)`
  (n counts requests from 0). It records the requests and the most it had in flight at once;
  a request stops counting as in flight before its reply is written, so that number never
  exceeds what the client has in flight."""

  def __init__(self, reply: Callable[[int, Any], Reply], path: str = "/api"):
    self.reply = reply
    self.lock = threading.Lock()
    self.requests: list[Request] = []
    self.in_flight = 0
    self.max_in_flight = 0
    self.released = threading.Event()
    server = self

    class Handler(BaseHTTPRequestHandler):

      def do_POST(self):  # pylint: disable=invalid-name
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        with server.lock:
          n = len(server.requests)
          server.requests.append(Request(self.path, dict(self.headers), body))
          server.in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
          reply = server.reply(n, body)
          if reply.delay_s:
            server.released.wait(reply.delay_s)
        finally:
          with server.lock:
            server.in_flight -= 1
        data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        try:
          self.send_response(reply.status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          for k, v in reply.headers.items():
            self.send_header(k, v)
          self.end_headers()
          self.wfile.write(data)
        except OSError:  # the client gave up (timed out) and closed the connection
          pass

      def log_message(self, *args):
        del args

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
    self.thread.start()

  @property
  def count(self) -> int:
    with self.lock:
      return len(self.requests)

  def close(self):
    self.released.set()  # frees hanging handlers
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(timeout=5)
