"""A naive HTTP/1.1 backend for the smuggling e2e scenario: Python's http.server, honouring only
an exact `Transfer-Encoding: chunked` and an int()-parsed Content-Length, like many real apps.

Usage: naive_backend.py HOST PORT RECORD_FILE. Every request it parses (and every request it rejects)
becomes one JSON line in RECORD_FILE, with the connection it came on and its order there, so the
scenario can tell which client request each backend request belongs to.
"""

import http.server
import itertools
import json
import socketserver
import sys
import threading

MAX_BODY = 1 << 20
CONNECTIONS = itertools.count(1)
LOCK = threading.Lock()
RECORD = None


def record(event):
    line = json.dumps(event)
    with LOCK:
        RECORD.write(line + "\n")
        RECORD.flush()


class Incomplete(Exception):
    """The peer closed the connection in the middle of a message."""


class Rejected(Exception):
    """What a naive parser cannot read either."""


def read_exact(rfile, n):
    data = rfile.read(n)
    if len(data) < n:
        raise Incomplete("eof in body")
    return data


def read_chunked(rfile):
    total = 0
    while True:
        line = rfile.readline(65537)
        if not line:
            raise Incomplete("eof in chunk size")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise Rejected("bad chunk size %r" % line[:80])
        if size < 0 or total + size > MAX_BODY:
            raise Rejected("chunk size out of range")
        if size == 0:
            break
        read_exact(rfile, size)
        total += size
        if not rfile.readline(65537):
            raise Incomplete("eof after chunk")
    while True:
        line = rfile.readline(65537)
        if not line:
            raise Incomplete("eof in trailers")
        if line in (b"\r\n", b"\n"):
            return total


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Bounded: an idle or stuck connection is closed after this long.
    timeout = 10

    def setup(self):
        super().setup()
        self.conn_id = next(CONNECTIONS)
        self.seq = 0

    def log_message(self, format, *args):
        pass

    def event(self, kind, **fields):
        self.seq += 1
        fields.update(kind=kind, conn=self.conn_id, seq=self.seq)
        record(fields)

    def send_error(self, code, message=None, explain=None):
        # Reached when the request line or the header fields do not parse.
        line = getattr(self, "raw_requestline", b"") or b""
        self.event("rejected", reason="%d %s" % (code, message or ""), line=line.decode("latin-1"))
        super().send_error(code, message, explain)

    def __getattr__(self, name):
        # Every method, even ones invented by a smuggled request line, lands in `serve`.
        if name.startswith("do_"):
            return self.serve
        raise AttributeError(name)

    def serve(self):
        te = self.headers.get("Transfer-Encoding")
        cl = self.headers.get("Content-Length")
        target = self.path
        hosts = self.headers.get_all("Host") or []
        try:
            if te == "chunked":
                body = read_chunked(self.rfile)
            elif cl is not None:
                n = int(cl)
                if n < 0 or n > MAX_BODY:
                    raise Rejected("content-length out of range")
                body = len(read_exact(self.rfile, n))
            else:
                body = 0
        except Incomplete as e:
            self.event("incomplete", reason=str(e), line=self.requestline)
            self.close_connection = True
            return
        except (Rejected, ValueError) as e:
            self.event("rejected", reason=str(e), line=self.requestline)
            self.close_connection = True
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            return
        self.event("request", method=self.command, target=target, hosts=hosts, body=body)
        answer = b"server: python\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    global RECORD
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    RECORD = open(path, "a", encoding="utf-8")
    server = Server((host, port), Handler)
    print("naive python backend on %s:%d" % (host, port), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
