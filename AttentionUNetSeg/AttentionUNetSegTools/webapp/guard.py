"""Who may use the server: the holder of a per-start token, from the server's own page, within size caps.

trame and wslink authenticate each websocket with a secret: the page reads it from its address
(``?secret=...``; trame's client then removes it from the address bar) and sends it in wslink's first message,
``wslink.hello``; the server compares it with its ``--authKey``. Their default secret is the public
"wslink-secret"; here it is a random token made at each start. A browser lets any web page open a websocket to
127.0.0.1, so the websocket's Origin must also be the server's own page: a page elsewhere cannot connect even
when it knows the token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import struct
from typing import Callable

import wslink.protocol
from aiohttp import web
from wslink.chunking import HEADER_LENGTH, UnChunker
from wslink.websocket import LinkProtocol

logger = logging.getLogger(__name__)

# wslink's cap on one websocket message is 4 MiB (trame raises it to 10 MB); the page cuts what it sends into
# messages of this size, so a larger one comes only from a client that is not the page.
WS_MESSAGE_BYTES = 2**20
# wslink reassembles a client's messages from those pieces; once the client is authenticated it lets one
# declare up to 4 GiB and allocates the declared size before the bytes arrive. The largest message the page
# sends is one upload slice (ui.UPLOAD_SLICE_BYTES, 4 MiB).
PENDING_MESSAGE_BYTES = 8 * 2**20
WEBSOCKET_PATH = "/ws"
ENTRY_PATHS = ("/", "/index.html")
# No other site may frame the page (clicks through an invisible frame), nor learn its address from a link.
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
OPEN_PRINTED = "open the address that `attention-unet-seg serve` printed"


def is_loopback(host: str) -> bool:
    """An address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def protect(server, token: str, loopback: bool) -> None:
    """Before the server starts: the token as wslink's secret, the origin check, the caps on messages."""
    server.cli.set_defaults(authKey=token)  # trame's --authKey: wslink's secret, checked in Clients.validateToken
    server.options["ws_max_msg_size"] = WS_MESSAGE_BYTES  # trame hands it to wslink's websocket as its cap ...
    wslink.protocol.MAX_MSG_SIZE = WS_MESSAGE_BYTES  # ... and wslink tells the page (read once, at its import)
    wslink.protocol.UnChunker = CappedUnChunker  # wslink has no setting for it
    server.controller.on_server_bind.add(lambda web_server: web_server.app.middlewares.append(
        _middleware(token.encode(), loopback)))


class Clients(LinkProtocol):
    """wslink's hooks on each websocket: the token check of its first message, and its end."""

    def __init__(self, on_change: Callable[[], None], on_close: Callable[[str], None]):
        super().__init__()
        self.authenticated: set[str] = set()
        self.web_server = None  # wslink's server, which knows the client of the message being handled
        self._on_change, self._on_close = on_change, on_close

    def bind(self, server) -> None:
        server.add_protocol_to_configure(lambda protocol: protocol.registerLinkProtocol(self))
        server.controller.on_server_bind.add(lambda web_server: setattr(self, "web_server", web_server))

    @property
    def current(self) -> str | None:
        """The client whose message is being handled."""
        return None if self.web_server is None else self.web_server.last_active_client_id

    async def validateToken(self, token, client_id: str) -> bool:
        """wslink's own check is ``token == secret``: this one takes the same time whatever the token."""
        secret = (self.coreServer.secret or "").encode()
        if not (isinstance(token, str) and hmac.compare_digest(token.encode(), secret)):
            logger.warning("refused a websocket: wrong or missing token")
            return False
        self.authenticated.add(client_id)
        self._on_change()
        return True

    def onClose(self, client_id: str) -> None:
        self.authenticated.discard(client_id)
        self._on_close(client_id)
        self._on_change()


class CappedUnChunker(UnChunker):
    """wslink's reassembly of messages, with a cap on the bytes declared by all of a client's pending messages
    (wslink allocates each declared size at once and keeps any number pending)."""

    def set_max_message_size(self, size: int) -> None:
        super().set_max_message_size(min(size, PENDING_MESSAGE_BYTES))

    def process_chunk(self, chunk: bytes):
        message_id, _, declared = struct.unpack_from("<III", chunk[:HEADER_LENGTH])
        if message_id not in self.pending_messages:
            pending = sum(len(message["content"]) for message in self.pending_messages.values())
            if pending + declared > self.max_message_size:
                raise ValueError(f"a message of {declared} bytes is over the cap of {self.max_message_size}")
        return super().process_chunk(chunk)


def _middleware(token: bytes, loopback: bool):
    @web.middleware
    async def guard(request: web.Request, handler):
        refusal = _refusal(request, token, loopback)
        if refusal:
            logger.warning("refused %s %s: %s", request.method, request.path, refusal)
            return web.Response(status=403, text=f"error: {refusal}\n")
        if request.path == WEBSOCKET_PATH:
            return await _websocket(request, handler)
        response = await handler(request)
        response.headers.update(PAGE_HEADERS)
        return response

    return guard


def _refusal(request: web.Request, token: bytes, loopback: bool) -> str:
    """Why the request is refused; empty when it is not."""
    try:
        host = request.url.host or ""
    except ValueError:
        host = ""
    if loopback and not is_loopback(host):  # a site whose name was made to point at 127.0.0.1 (DNS rebinding)
        return f"refused the host name {request.host[:100]!r}; this server answers only on this machine; {OPEN_PRINTED}"
    origin = request.headers.get("Origin")
    if origin is not None and origin not in (f"http://{request.host}", f"https://{request.host}"):
        return f"refused a page from {origin[:100]!r}; only this server's own page may use it; {OPEN_PRINTED}"
    if request.path in ENTRY_PATHS and not hmac.compare_digest(request.query.get("secret", "").encode(), token):
        return f"no valid token in the address; the server prints its token at each start (?secret=...); {OPEN_PRINTED}"
    return ""


async def _websocket(request: web.Request, handler):
    """wslink ends a connection by raising (a message over the cap, a malformed frame): end it here, with one
    line in the log instead of aiohttp's traceback."""
    try:
        return await handler(request)
    except Exception as error:  # noqa: BLE001 (whatever a client sent, the server logs one line and goes on)
        logger.warning("closed a websocket: %s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=400)
